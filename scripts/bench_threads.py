"""Prompt-processing and generation speed of a GGUF for a sweep of thread counts, with the pinned llama-bench.

    python -m scripts.bench_threads --llama-bin BIN --gguf ggml-model-q4_0.gguf --sweep 1,2,4 \
        --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --stage q4_0 \
        --read-bandwidth build/read_bandwidth --read-mib 1024 --out q4_0.json

Recommended: `threads` (generation) and `threads_batch` (prompt processing), each
the smallest count within --tolerance-pct of its fastest (see cpuforge.evaluate.bench).
The CPU variant and features of the build that ran (cpuforge.llama.runtime.cpu_backend)
are recorded beside the figures. At each thread count, first the machine's read bandwidth
(the project's kernel), then generation's effective bandwidth (tg tokens/s x the bytes a
token reads) as a fraction of it (cpuforge.evaluate.bandwidth).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.evaluate.bandwidth import bytes_per_token, effective, read_bandwidth
from cpuforge.evaluate.bench import bench, parse_threads, recommended_threads
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
    parser.add_argument("--read-bandwidth", type=Path, required=True, help="the read-bandwidth kernel")
    parser.add_argument("--read-mib", type=int, default=1024, help="its buffer, far larger than the caches")
    args = parser.parse_args()
    sweep = parse_threads(args.sweep)
    read = {t: read_bandwidth(args.read_bandwidth, t, args.read_mib) for t in sweep}
    runs = bench(args.llama_bin, args.gguf, sweep, args.prompt_tokens, args.gen_tokens, args.repetitions)
    per_token = bytes_per_token(args.gguf, args.gen_tokens)
    for r in runs:
        r["read_gbps"] = read[r["threads"]]
    effective(runs, per_token["total"])
    best = recommended_threads(runs, args.tolerance_pct)
    backend = cpu_backend(args.llama_bin)
    log.info("%s", describe_cpu_backend(backend))
    write_json(args.out, {"stage": args.stage, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                          "repetitions": args.repetitions, "tolerance_pct": args.tolerance_pct,
                          "recommended_threads": best["threads"], "recommended_threads_batch": best["threads_batch"],
                          "cpu_backend": backend, "bytes_per_token": per_token, "read_mib": args.read_mib,
                          "runs": runs})  # fmt: skip
    log.info("%s: %d threads for generation, %d for prompt processing recommended", args.stage, best["threads"],
             best["threads_batch"])  # fmt: skip


if __name__ == "__main__":
    run(main)
