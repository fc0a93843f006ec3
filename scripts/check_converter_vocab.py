"""Check, before the merge, that the pinned llama.cpp converter can read the tokenizer the merged model will carry.

    python -m scripts.check_converter_vocab --source LLAMA_SOURCE --base BASE --adapter A1 [--adapter A2 ...] \\
        --out results/{model}/checks/converter-vocab.json

Stages the merged folder's config.json and tokenizer files (the last adapter's that
has them, else the base's) as the convert step stages them, and runs the converter's
vocabulary-only mode on them: a tokenizer it cannot read (for example a BPE
pre-tokenizer it does not recognise) stops the run here, in seconds, with one
sentence naming the tokenizer folder and what the converter said.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.convert import check_converter_vocab
from cpuforge.io.files import atomic_output, write_json

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--base", type=Path, required=True, help="HF model folder")
    parser.add_argument("--adapter", type=Path, action="append", required=True, help="PEFT LoRA folder; repeat, in order")
    add_flags(parser, "out")
    args = parser.parse_args()
    with atomic_output(args.out) as tmp:
        record = check_converter_vocab(args.source, args.base, args.adapter, tmp.with_name(tmp.name + ".work"))
        write_json(tmp, record)
    log.info("the pinned converter reads %s: %s", record["tokenizer"], record)


if __name__ == "__main__":
    run(main)
