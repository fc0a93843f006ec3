"""Example:

    python -m scripts.check_tokenizer --gguf results/demo/ggml-model-q4_0.gguf --merged results/demo/merged \
        --base resources/demo/base --task-data data/demo_task/train.jsonl --task-data data/demo_task/heldout.jsonl \
        --llama-bin BUILD/bin --out results/demo/checks/tokenizer-q4_0.json

The step is described once, in cpuforge.checks.tokenizer's docstring, which --help shows first.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.errors import InputError
from cpuforge.io.files import write_json
from cpuforge.checks.tokenizer import check_tokenizer
import cpuforge.checks.tokenizer as library

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=library.__doc__, epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(parser, "gguf", "merged", "llama-bin", "out")
    parser.add_argument("--base", type=Path, help="base HF model folder, to find the words an adapter added")
    parser.add_argument("--task-data", type=Path, action="append", default=[], help="task data file; repeat")
    args = parser.parse_args()
    for path in [args.gguf, args.merged, *args.task_data]:
        if not path.exists():
            raise InputError(f"{path}: not found.")
    record = check_tokenizer(args.gguf, args.merged, args.base, args.task_data, args.llama_bin)
    write_json(args.out, record, ensure_ascii=False)
    log.info("tokenizer parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
