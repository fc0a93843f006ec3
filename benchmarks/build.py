"""Native against portable llama.cpp: build time, and llama-bench speed side by side in one run.

    python -m benchmarks.build results/demo/ggml-model-f16.gguf results/demo/ggml-model-q4_0.gguf \
        --threads 1 2 [--build-dir build/llama.cpp] [--rounds 3] [--jobs 2]

Both flavours of `llama_cpp.cpu` are built from the one verified source in
<build-dir>/<commit>/source (the workflow's fetch_llama_cpp makes it), each into
<build-dir>/<commit>/<flavour>/ as the workflow builds it; a flavour built earlier by this
program is reused with the build time it recorded then (<flavour>/BUILD.json), so delete that
folder to time it again. Then, for every model, both builds run llama-bench (pp --prompt-tokens,
tg --gen-tokens, every thread count) in turns, --rounds times, native first in odd rounds and
portable first in even ones; each figure is the best round, as other work on a shared machine
only ever slows a run down. The ratio portable ÷ native decides the default flavour: portable
when it is at least 0.97 everywhere (docs/builds.md, "One build for every CPU"). The table is logged, the
figures go to --out (default benchmarks/llama_cpp/build.json).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cpuforge.evaluate.bench import bench
from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.io.files import read_json, write_json
from cpuforge.llama.runtime import check_threads, cpu_backend, describe_cpu_backend
from cpuforge.llama.build import FLAVOURS, build
from cpuforge.paths import BUILD_DIR, LLAMA_TOOLS, llama_bin, llama_source

log = logging.getLogger(__name__)

# the speed a portable build must keep of a native one to be the default
DEFAULT_RULE = 0.97


def find_source(build_dir: Path) -> tuple[str, Path]:
    sources = sorted(build_dir.glob("*/source/SOURCE.json"))
    if len(sources) != 1:
        raise InputError(
            f"{build_dir}: {len(sources)} verified llama.cpp sources; fetch one (`snakemake -c1 llama_cpp`) "
            "or give --build-dir the folder that holds exactly one."
        )
    commit = read_json(sources[0])["commit"]
    return commit, llama_source(build_dir, commit)


def ensure_build(build_dir: Path, commit: str, flavour: str, jobs: int) -> tuple[Path, float]:
    """The flavour's bin folder and its build's wall time in seconds (built now, or recorded then)."""
    bin_dir = llama_bin(build_dir, commit, flavour)
    record = bin_dir.parent / "BUILD.json"
    if record.is_file() and (bin_dir / "llama-bench").is_file():
        seconds = read_json(record)["seconds"]
        log.info("%s: reusing %s (built in %.0f s)", flavour, bin_dir, seconds)
        return bin_dir, seconds
    start = time.monotonic()
    build(llama_source(build_dir, commit), bin_dir.parent / "cmake", bin_dir, jobs, flavour, LLAMA_TOOLS)
    seconds = time.monotonic() - start
    write_json(record, {"flavour": flavour, "seconds": seconds, "jobs": jobs, "tools": list(LLAMA_TOOLS)})
    log.info("%s: built in %.0f s with %d jobs", flavour, seconds, jobs)
    return bin_dir, seconds


def side_by_side(bins: dict[str, Path], model: Path, threads: list[int], prompt_tokens: int, gen_tokens: int,
                 rounds: int) -> list[dict]:  # fmt: skip
    """One row per thread count: each flavour's best pp and tg tokens/s over the rounds, and their ratios."""
    best: dict[str, dict[int, dict]] = {f: {} for f in bins}
    for r in range(rounds):
        for flavour in list(bins) if r % 2 == 0 else list(bins)[::-1]:
            for row in bench(bins[flavour], model, threads, prompt_tokens, gen_tokens, repetitions=1):
                kept = best[flavour].setdefault(row["threads"], {"pp_tps": 0.0, "tg_tps": 0.0})
                for key in ("pp_tps", "tg_tps"):
                    kept[key] = max(kept[key], row[key])
    rows = []
    for t in threads:
        row = {"model": model.name, "threads": t}
        for test in ("pp", "tg"):
            for flavour in bins:
                row[f"{flavour}_{test}_tps"] = best[flavour][t][f"{test}_tps"]
            row[f"{test}_ratio"] = row[f"portable_{test}_tps"] / row[f"native_{test}_tps"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="GGUF files, e.g. the demo's f16 and q4_0")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs of each build")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/llama_cpp/build.json"))
    args = parser.parse_args()
    threads = sorted({check_threads(t) for t in args.threads})
    for model in args.models:
        if not model.is_file():
            raise InputError(f"{model}: file not found.")
    commit, _ = find_source(args.build_dir)
    builds = {flavour: ensure_build(args.build_dir, commit, flavour, args.jobs) for flavour in FLAVOURS}
    bins = {flavour: bin_dir for flavour, (bin_dir, _) in builds.items()}
    portable = cpu_backend(bins["portable"])
    log.info("portable picks: %s", describe_cpu_backend(portable))
    rows = [row for model in args.models for row in side_by_side(bins, model, threads, args.prompt_tokens,
                                                                 args.gen_tokens, args.rounds)]  # fmt: skip
    worst = min(min(r["pp_ratio"], r["tg_ratio"]) for r in rows)
    default = "portable" if worst >= DEFAULT_RULE else "native"
    log.info("| model | threads | pp native | pp portable | pp ratio | tg native | tg portable | tg ratio |")
    log.info("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        log.info("| %s | %d | %.1f | %.1f | %.3f | %.1f | %.1f | %.3f |", r["model"], r["threads"], r["native_pp_tps"],
                 r["portable_pp_tps"], r["pp_ratio"], r["native_tg_tps"], r["portable_tg_tps"], r["tg_ratio"])  # fmt: skip
    for flavour, (_, seconds) in builds.items():
        log.info("%s build: %.0f s (%.1f min) with %d jobs", flavour, seconds, seconds / 60, args.jobs)
    log.info("worst portable/native ratio %.3f: by the %.2f rule the default is %s", worst, DEFAULT_RULE, default)
    write_json(args.out, {
        "commit": commit, "threads": threads, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "rounds": args.rounds, "build_seconds": {f: s for f, (_, s) in builds.items()}, "jobs": args.jobs,
        "portable_cpu_backend": portable, "rows": rows, "worst_ratio": worst, "default": default,
    })  # fmt: skip
    log.info("figures written to %s", args.out)


if __name__ == "__main__":
    run(main)
