"""Prompt-processing and generation speed of a GGUF for a sweep of thread counts, with the pinned llama-bench.

Two thread counts are recommended, since the two phases are bound by different
things (llama.cpp PR #2534, which added --threads-batch): `threads` for generation,
which is memory-bound and stops gaining once the memory bus is full, and
`threads_batch` for prompt processing, which is compute-bound and gains from
every core. Each is the smallest count whose speed is within --tolerance-pct of
the fastest: beyond that point more threads only take cores from everything else.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.llama.runtime import LOAD_MODE, check_threads

log = logging.getLogger(__name__)

# A generation repetition shorter than this is timed mostly as the machine's jitter: on a 2-core machine two
# files' order flipped from run to run at 0.15 s a repetition, and held at 2 s.
MIN_REPETITION_SECONDS = 1.0
MAX_GEN_TOKENS = 256  # the most lasting_tokens asks for: a tiny model's repetition stays under a second


def parse_threads(text: str) -> list[int]:
    try:
        threads = sorted({check_threads(int(t)) for t in text.split(",")})
    except ValueError:
        raise InputError(f"--sweep: {text!r} is not a comma-separated list of thread counts.") from None
    return threads


def llama_bench(bin_dir: Path, files: list[Path], threads: list[int], prompt_tokens: int, gen_tokens: int,
                repetitions: int) -> dict[tuple[str, int], dict]:  # fmt: skip
    """One run of the pinned llama-bench over every file and thread count, in turns: mean and standard deviation
    of tokens/s of both tests (pp, prompt processing, where `prompt_tokens`; tg, generation), by (file,
    threads)."""
    models = [word for f in files for word in ("-m", str(f))]
    cmd = [str(bin_dir / "llama-bench"), *models, "-t", ",".join(map(str, threads)), "-p", str(prompt_tokens),
           "-n", str(gen_tokens), "-r", str(repetitions), "-o", "json", "--progress", *LOAD_MODE]  # fmt: skip
    log.info("running %s", " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=sys.stderr, text=True).stdout
    rows: dict[tuple[str, int], dict] = {}
    for test in json.loads(out):
        kind = "pp" if test["n_gen"] == 0 else "tg"
        row = rows.setdefault((test["model_filename"], test["n_threads"]), {})
        row.update({f"{kind}_tps": test["avg_ts"], f"{kind}_tps_std": test["stddev_ts"]})
    return rows


def bench(bin_dir: Path, gguf: Path, threads: list[int], prompt_tokens: int, gen_tokens: int,
          repetitions: int) -> list[dict]:  # fmt: skip
    """One row per thread count: mean and standard deviation of tokens/s of both tests."""
    measured = llama_bench(bin_dir, [gguf], threads, prompt_tokens, gen_tokens, repetitions)
    rows = [{"threads": t, **measured[(str(gguf), t)]} for t in threads]
    for row in rows:
        log.info("%2d threads: pp %.1f t/s, tg %.1f t/s", row["threads"], row["pp_tps"], row["tg_tps"])
    return rows


def bench_side_by_side(bin_dir: Path, files: list[Path], threads: int, gen_tokens: int, repetitions: int,
                       prompt_tokens: int = 0) -> list[dict]:  # fmt: skip
    """Generation speed (and with `prompt_tokens`, prompt processing's) of several GGUF files side by side at
    `threads`, the only way their speeds compare on a noisy machine: `repetitions` rounds, each one llama-bench
    run over every file once, the order turned a step each round (turned), so a machine that slows down or
    speeds up during the runs moves every file alike. Where a repetition of `gen_tokens` lasts under
    MIN_REPETITION_SECONDS on the fastest file of the first round, the rounds start again generating enough
    more (lasting_tokens). One row per file: mean and standard deviation of tokens/s over the rounds, and the
    tokens each generated (`tg_tokens`)."""
    rounds = [llama_bench(bin_dir, files, [threads], prompt_tokens, gen_tokens, 1)]
    fastest = max(row["tg_tps"] for row in rounds[0].values())
    if (longer := lasting_tokens(gen_tokens, fastest)) > gen_tokens:
        log.info("%d tokens last %.2f s on the fastest file, too short to time: measured again generating %d",
                 gen_tokens, gen_tokens / fastest, longer)  # fmt: skip
        rounds, gen_tokens = [], longer
    while len(rounds) < repetitions:
        order = turned(files, len(rounds), repetitions)
        rounds.append(llama_bench(bin_dir, order, [threads], prompt_tokens, gen_tokens, 1))
    rows = [{**over_rounds([r[(str(f), threads)] for r in rounds]), "tg_tokens": gen_tokens} for f in files]
    for f, row in zip(files, rows, strict=True):
        log.info("%s: tg %.1f ± %.1f t/s", f.name, row["tg_tps"], row["tg_tps_std"])
    return rows


def turned(files: list[Path], round_: int, rounds: int) -> list[Path]:
    """The files in round `round_` of `rounds`: the list turned by that share of its length."""
    step = round_ * len(files) // rounds
    return files[step:] + files[:step]


def over_rounds(runs: list[dict]) -> dict:
    """One file's tokens/s of every round: each test's mean and standard deviation (0 for one round)."""
    row = {}
    for key in ("pp_tps", "tg_tps"):
        if key in runs[0]:
            values = [run[key] for run in runs]
            row[key], row[f"{key}_std"] = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def lasting_tokens(gen_tokens: int, tps: float) -> int:
    """The tokens a generation repetition needs at `tps` tokens/s to last MIN_REPETITION_SECONDS: a multiple of
    `gen_tokens`, never fewer, and no more than MAX_GEN_TOKENS unless `gen_tokens` is."""
    times = math.ceil(MIN_REPETITION_SECONDS * tps / gen_tokens)
    return max(gen_tokens, min(times * gen_tokens, MAX_GEN_TOKENS))


def fewest_threads(runs: list[dict], key: str, tolerance_pct: float) -> int:
    """The fewest threads whose `key` tokens/s is within tolerance_pct of the fastest."""
    fastest = max(r[key] for r in runs)
    return min(r["threads"] for r in runs if r[key] >= fastest * (1 - tolerance_pct / 100))


def recommended_threads(runs: list[dict], tolerance_pct: float) -> dict[str, int]:
    """`threads` for generation (tg), `threads_batch` for prompt processing (pp)."""
    return {"threads": fewest_threads(runs, "tg_tps", tolerance_pct),
            "threads_batch": fewest_threads(runs, "pp_tps", tolerance_pct)}  # fmt: skip
