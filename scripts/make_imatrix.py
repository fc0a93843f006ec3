"""Example:

    python -m scripts.make_imatrix --llama-bin BUILD/bin --gguf results/demo/ggml-model-f16.gguf \
        --merged results/demo/merged --task-data data/demo_task/train.jsonl --prose-chars 100000 \
        --out results/demo/imatrix.gguf --threads 8

The step is described once, in cpuforge.llama.imatrix's docstring, which --help shows first.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.errors import InputError
from cpuforge.llama.imatrix import calibration_text, make_imatrix
from cpuforge.io.provenance import provenance, write_provenance
import cpuforge.llama.imatrix as library

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=library.__doc__, epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(parser, "llama-bin", "gguf", "merged", "ctx-size", "out", "threads", gguf={"help": "the f16 GGUF"},
              merged={"help": "merged HF model folder (its chat template)"})  # fmt: skip
    parser.add_argument("--task-data", type=Path, action="append", default=[], help="training data file; repeat")
    parser.add_argument("--text", type=Path, action="append", default=[], help="further calibration text file; repeat")
    parser.add_argument("--prose-chars", type=int, default=100_000, help="characters of general prose (0: none)")
    parser.add_argument("--chunks", type=int, default=0, help="chunks to process (0: all the text gives)")
    args = parser.parse_args()
    for path in [args.gguf, args.merged, *args.task_data, *args.text]:
        if not path.exists():
            raise InputError(f"{path}: not found.")
    text = calibration_text(args.merged, args.task_data, args.prose_chars, args.text)
    threads = check_threads(args.threads)
    facts = make_imatrix(args.llama_bin, args.gguf, text, args.out, args.ctx_size, args.chunks, threads)
    inputs = {"gguf": args.gguf, **{f"task_data{i}": p for i, p in enumerate(args.task_data, 1)}}
    inputs |= {f"text{i}": p for i, p in enumerate(args.text, 1)}
    record = provenance(args.out, inputs, step="make_imatrix", prose_chars=args.prose_chars, **facts)
    write_provenance(args.out, record)
    log.info("importance matrix written to %s", args.out)


if __name__ == "__main__":
    run(main)
