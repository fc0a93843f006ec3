"""Measure draftless speculative decoding on the task's held-out prompts, against plain decoding.

    python -m scripts.eval_speculation --llama-bin BIN --gguf results/m/ggml-model-q4_0.gguf \
        --merged results/m/merged --heldout heldout.jsonl --bench results/m/report/bench/q4_0.json \
        --max-new-tokens 48 --rounds 2 --tolerance-pct 5 --stage q4_0 --out speculation/q4_0.json

llama-server as scripts.serve runs it, at the bench's recommended generation threads, plain and with each
--spec-type in turns (cpuforge.evaluate.speculation): tokens/s, the drafts' acceptance rate, whether every
greedy answer stayed the same, and the verdict scripts.serve follows.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.errors import InputError
from cpuforge.evaluate.speculation import measure, verdict
from cpuforge.evaluate.task import hf_prompts
from cpuforge.io.files import read_json, write_json
from cpuforge.io.gguf import check_gguf
from cpuforge.text.task import read_heldout

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "merged", "heldout", "out")
    parser.add_argument("--bench", type=Path, required=True, help="bench_threads' JSON: its recommended threads")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="each setting's runs, in turns; its best counts")
    parser.add_argument("--tolerance-pct", type=float, default=5.0, help="how much faster a setting must be to win")
    parser.add_argument("--stage", required=True)
    args = parser.parse_args()
    if args.heldout is None:
        raise InputError("--heldout: speculation is measured on the task's held-out prompts; this model has none.")
    check_gguf(args.gguf)
    threads = read_json(args.bench)["recommended_threads"]
    _, prompts = hf_prompts(args.merged, read_heldout(args.heldout))
    results = measure(args.llama_bin, args.gguf, prompts, args.max_new_tokens, threads, args.rounds)
    decision = verdict(results, args.tolerance_pct)
    write_json(args.out, {"stage": args.stage, "threads": threads, "rows": len(prompts), "rounds": args.rounds,
                          "max_new_tokens": args.max_new_tokens, "tolerance_pct": args.tolerance_pct,
                          "settings": results, **decision})  # fmt: skip
    log.info("%s", decision["sentence"])


if __name__ == "__main__":
    run(main)
