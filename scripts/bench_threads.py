"""Prompt-processing and generation speed of a GGUF for a sweep of thread counts, with the pinned llama-bench.

    python -m scripts.bench_threads --bench BIN/llama-bench --model ggml-model-q4_0.gguf --threads 1,2,4 \
        --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --stage q4_0 --out q4_0.json

The recommended thread count is the smallest whose generation speed is within
--tolerance-pct of the fastest: generation is what a chat user waits for, and
beyond that point more threads only take cores from everything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from scripts.common import InputError, check_threads, run, write_json

log = logging.getLogger(__name__)


def parse_threads(text: str) -> list[int]:
    try:
        threads = sorted({check_threads(int(t)) for t in text.split(",")})
    except ValueError:
        raise InputError(f"--threads: {text!r} is not a comma-separated list of thread counts.") from None
    return threads


def bench(llama_bench: Path, gguf: Path, threads: list[int], prompt_tokens: int, gen_tokens: int,
          repetitions: int) -> list[dict]:  # fmt: skip
    """One row per thread count: mean and standard deviation of tokens/s of both tests."""
    cmd = [str(llama_bench), "-m", str(gguf), "-t", ",".join(map(str, threads)), "-p", str(prompt_tokens),
           "-n", str(gen_tokens), "-r", str(repetitions), "-o", "json"]  # fmt: skip
    log.info("running %s", " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=sys.stderr, text=True).stdout
    rows = {t: {"threads": t} for t in threads}
    for test in json.loads(out):
        kind = "pp" if test["n_gen"] == 0 else "tg"
        rows[test["n_threads"]].update({f"{kind}_tps": test["avg_ts"], f"{kind}_tps_std": test["stddev_ts"]})
    for row in rows.values():
        log.info("%2d threads: pp %.1f t/s, tg %.1f t/s", row["threads"], row["pp_tps"], row["tg_tps"])
    return list(rows.values())


def recommended_threads(runs: list[dict], tolerance_pct: float) -> int:
    """The fewest threads whose generation tokens/s is within tolerance_pct of the fastest."""
    fastest = max(r["tg_tps"] for r in runs)
    return min(r["threads"] for r in runs if r["tg_tps"] >= fastest * (1 - tolerance_pct / 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, required=True, help="the pinned llama-bench")
    parser.add_argument("--model", type=Path, required=True, help="GGUF file")
    parser.add_argument("--threads", required=True, help="comma-separated thread counts, e.g. 1,2,4")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--tolerance-pct", type=float, default=5.0)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = bench(args.bench, args.model, parse_threads(args.threads), args.prompt_tokens, args.gen_tokens,
                 args.repetitions)  # fmt: skip
    best = recommended_threads(runs, args.tolerance_pct)
    write_json(args.out, {"stage": args.stage, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                          "repetitions": args.repetitions, "tolerance_pct": args.tolerance_pct,
                          "recommended_threads": best, "runs": runs})  # fmt: skip
    log.info("%s: %d threads recommended", args.stage, best)


if __name__ == "__main__":
    run(main)
