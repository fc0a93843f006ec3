"""The plan table of a run's jobs and the preflight of a local run: each job's figures held against this
machine's memory and the free disk where it writes, refused in one sentence before any job runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cpuforge.io.files import atomic_output
from cpuforge.constants import MIB
from cpuforge.sizing.costs import Need


def machine_memory_mb() -> int:
    """MemTotal of /proc/meminfo, in MiB."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo states no MemTotal.")


def file_system(path: str | Path) -> tuple[int, int]:
    """The device of the file system that holds `path`, or would hold it (its nearest existing parent),
    and its free MiB."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path.stat().st_dev, shutil.disk_usage(path).free // MIB


def free_disk_mb(path: str | Path) -> int:
    return file_system(path)[1]


@dataclass(frozen=True)
class Job:
    """One job of a run with its figures: the row of the plan table."""

    rule: str
    model: str
    job: str  # the other wildcards, e.g. qtype=q4_0
    output: str
    need: Need


def refusal(job: Job, memory_mb: int, free_mb: int, written_before_mb: int = 0) -> str | None:
    """The one sentence that stops a local run before any rule runs, or None when `job` fits the machine:
    its memory, or its disk on top of `written_before_mb` that the jobs before it leave on the same disk."""
    what = f"rule {job.rule}" + (f" ({job.job})" if job.job else "") + f" for model {job.model}"
    if job.need.mem_mb > memory_mb:
        return (f"{what} needs {job.need.mem_mb} MiB of memory, but this machine has {memory_mb} MiB; run it on a "
                "larger one (or with --profile profiles/slurm).")  # fmt: skip
    if written_before_mb + job.need.disk_mb > free_mb:
        # the jobs before it are named only when they are what leaves too little
        fits_alone = job.need.disk_mb <= free_mb
        before = f" on top of the {written_before_mb} MiB that the run writes before it" if fits_alone else ""
        return f"{what} needs {job.need.disk_mb} MiB of disk{before}, but {free_mb} MiB are free where it writes."
    return None


COLUMNS = ("rule", "model", "job", "peak_rss_mib", "disk_mib", "runtime_min", "output")


def plan_table(jobs: list[Job]) -> str:
    """The jobs' figures as an aligned table; last the run's: its largest peak, the disk it needs (what
    it leaves, and its largest scratch file beside that) and the sum of the time limits."""
    rows = [COLUMNS[:-1]] + [(j.rule, j.model, j.job, j.need.mem_mb, j.need.disk_mb, j.need.runtime) for j in jobs]
    kept = sum(j.need.kept_mb for j in jobs)
    scratch = max((j.need.disk_mb - j.need.kept_mb for j in jobs), default=0)
    rows.append(("all", "", "", max((j.need.mem_mb for j in jobs), default=0), kept + scratch,
                 sum(j.need.runtime for j in jobs)))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(str(v).rjust(w) if isinstance(v, int) else str(v).ljust(w) for v, w in zip(r, widths)) for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def write_plan(jobs: list[Job], path: str | Path) -> None:
    """The plan as TSV, one job a line, with the output each job makes."""
    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join(map(str, (j.rule, j.model, j.job, j.need.mem_mb, j.need.disk_mb, j.need.runtime, j.output)))
              for j in jobs]  # fmt: skip
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def preflight_refusal(layers: Iterable[list[Job]], memory_mb: int, free_mb: int | None) -> str | None:
    """The sentence that refuses a local run, or None: `layers` its jobs in the order they can run, each
    held against `memory_mb` and the free disk where it writes (`free_mb`, or its file system's), counting
    what the jobs before it leave on the same file system."""
    written: dict[int, int] = {}
    for layer in layers:
        # within a layer the order is Snakemake's choice: the largest first, so it is the one named
        for job in sorted(layer, key=lambda j: (-j.need.disk_mb, j.rule, j.job)):
            device, space = file_system(job.output)
            if sentence := refusal(job, memory_mb, free_mb or space, written.get(device, 0)):
                return sentence
            written[device] = written.get(device, 0) + job.need.kept_mb
    return None
