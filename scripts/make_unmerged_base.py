"""The unmerged base for run-time LoRA: a HF folder of the base's weights with the merged model's tokenizer.

    python -m scripts.make_unmerged_base --base BASE --adapter A1 [--adapter A2 ...] --out results/demo/base

The folder links the base's safetensors (no copy), copies its config and generation
config, and gets the tokenizer files the merged folder gets (the last adapter's that
has them, else the base's), so base-{qtype}.gguf reads prompts as ggml-model-{qtype}.gguf
does. Every adapter is checked first: one that cannot run as a GGUF LoRA is refused
with one sentence naming it and why.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.merge.runtime_lora import make_unmerged_base

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="HF model folder")
    parser.add_argument(
        "--adapter", type=Path, action="append", required=True, help="PEFT LoRA folder; repeat, in order"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    make_unmerged_base(args.base, args.adapter, args.out)
    inputs = {"base": args.base, **{f"adapter{i}": a for i, a in enumerate(args.adapter, 1)}}
    write_provenance(args.out, provenance(args.out, inputs, step="make_unmerged_base"))
    log.info("unmerged base written to %s", args.out)


if __name__ == "__main__":
    run(main)
