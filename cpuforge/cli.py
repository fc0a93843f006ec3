"""What every step's CLI shares: logging set-up, bad input ending the step with its sentence, flags."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from cpuforge.errors import GateError, InputError

log = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def give_back_freed_memory() -> None:
    """Make glibc return every freed block of 1 MiB or more to the system, in this process and its children.

    glibc serves a block below its mmap threshold from its heap, and once a mapped block of up to 32 MiB
    is freed it raises the threshold to that size: a step that streams tensors of such sizes one at a
    time then keeps the freed ones in a heap it cannot shrink (a 7B merge peaked at 1129 MiB instead of
    918). A fixed threshold maps each large block on its own and unmaps it when it is freed."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # the children: the converter, llama.cpp
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD, for this process
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def exit_on_terminate() -> None:
    """SIGTERM (`kill`, SLURM's time limit and scancel) ends the step as an error would: its partial outputs
    and scratch files are removed on the way out (cpuforge.io.files.atomic_output), and a tool it is running
    with them, instead of being left until the next run (GBs of candidates in a 7B quant search)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run(main) -> None:
    """Run a step's main(): bad input ends it with its one sentence and exit code 2, a missed quality gate
    with its sentence and exit code 1, SIGTERM with its partial outputs removed and exit code 143."""
    give_back_freed_memory()
    setup_logging()
    exit_on_terminate()
    try:
        main()
    except InputError as e:
        log.error("%s", e)
        sys.exit(2)
    except GateError as e:
        log.error("%s", e)
        sys.exit(1)


# One flag per concept, meaning the same in every CLI (as mergekit's add_merge_options does).
FLAGS = {
    "gguf": {"type": Path, "required": True, "metavar": "FILE", "help": "GGUF file"},
    "merged": {"type": Path, "required": True, "metavar": "FOLDER", "help": "merged HF model folder (the reference)"},
    "hf": {"type": Path, "metavar": "FOLDER", "help": "HF model folder"},
    "llama-bin": {"type": Path, "required": True, "metavar": "FOLDER",
                  "help": "the pinned llama.cpp bin folder: its tools and libllama.so"},
    "heldout": {"type": Path, "metavar": "FILE", "help": "the task's held-out JSONL"},
    "ctx-size": {"type": int, "default": 512, "help": "context (window) length in tokens"},
    "threads": {"type": int, "default": 1, "help": "threads to use"},
    "out": {"type": Path, "required": True, "help": "output"},
    "lora": {"type": Path, "action": "append", "default": [], "metavar": "FILE",
             "help": "a GGUF LoRA applied to the GGUF at run time, at scale 1 (repeat for a stack, in order)"},
}  # fmt: skip


def add_flags(parser: argparse.ArgumentParser, *names: str, **overrides: dict) -> None:
    """Add the shared flags `names` ("gguf", "llama-bin", …); `overrides` holds, by the flag's name with
    underscores, the argparse keywords that differ in this CLI (a help text, required=False)."""
    for name in names:
        parser.add_argument(f"--{name}", **(FLAGS[name] | overrides.get(name.replace("-", "_"), {})))
