"""Prompt-processing and generation speed of a GGUF for a sweep of thread counts, with the pinned llama-bench.

    python -m scripts.bench_threads --llama-bin BIN --gguf ggml-model-q4_0.gguf --sweep 1,2,4 \
        --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --stage q4_0 --out q4_0.json

Recommended: `threads` (generation) and `threads_batch` (prompt processing), each
the smallest count within --tolerance-pct of its fastest (see cpuforge.evaluate.bench).
The CPU variant and features of the build that ran (cpuforge.llama.runtime.cpu_backend)
are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import logging

from cpuforge.evaluate.bench import bench, parse_threads, recommended_threads
from cpuforge.cli import add_flags, run
from cpuforge.io.files import write_json
from cpuforge.llama.runtime import cpu_backend, describe_cpu_backend

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "out")
    parser.add_argument("--sweep", required=True, help="comma-separated thread counts, e.g. 1,2,4")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--tolerance-pct", type=float, default=5.0)
    parser.add_argument("--stage", required=True)
    args = parser.parse_args()
    runs = bench(args.llama_bin, args.gguf, parse_threads(args.sweep), args.prompt_tokens, args.gen_tokens,
                 args.repetitions)  # fmt: skip
    best = recommended_threads(runs, args.tolerance_pct)
    backend = cpu_backend(args.llama_bin)
    log.info("%s", describe_cpu_backend(backend))
    write_json(args.out, {"stage": args.stage, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                          "repetitions": args.repetitions, "tolerance_pct": args.tolerance_pct,
                          "recommended_threads": best["threads"], "recommended_threads_batch": best["threads_batch"],
                          "cpu_backend": backend, "runs": runs})  # fmt: skip
    log.info("%s: %d threads for generation, %d for prompt processing recommended", args.stage, best["threads"],
             best["threads_batch"])  # fmt: skip


if __name__ == "__main__":
    run(main)
