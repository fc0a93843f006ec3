"""The plan's and the preflight's jobs, taken from Snakemake's own DAG: `all`'s, built inside the running
workflow for the plan, and the run's own for the preflight; each job's row from cpuforge.sizing.jobs."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpuforge.catalogue import RULES
from cpuforge.sizing.jobs import Sizing
from cpuforge.sizing.plan import Job, free_disk_mb, plan_table, preflight_refusal, refusal, write_plan

# one llama.cpp build serves every run: the plan counts its jobs only where their outputs are missing
SHARED = tuple(r.name for r in RULES if r.group == "llama_cpp")


def row(sizing: Sizing, job) -> Job | None:
    """A Snakemake job's row (None for a target rule, which only names files)."""
    return sizing.job(job.rule.name, dict(job.wildcards.items()), job.threads, job.output[0] if job.output else "")


def to_make(dag, job) -> bool:
    """Whether a job of the shared build has an output missing, or comes after one that has."""
    missing = not all(os.path.exists(f) for f in job.output)
    return missing or any(to_make(dag, d) for d in dag.job_dependencies(job) if d.rule.name in SHARED)


def target_jobs(workflow, target: str) -> list:
    """Every job of `target` as a run from scratch would have it, from Snakemake's own DAG of it: the jobs
    whose outputs exist count too, but the shared llama.cpp build only where it is missing."""
    from snakemake.dag import DAG

    dag = DAG(workflow, workflow.rules, targetfiles=set(), targetrules={workflow.get_rule(target)})
    # a job's `run:` code runs inside Snakemake's event loop, which cannot run another coroutine itself; the
    # jobs' default resources that read input sizes stay unevaluated (Snakemake's own nested-loop case), and
    # the coroutine that drops, whenever it is collected, is no news
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    with ThreadPoolExecutor(1) as thread:
        thread.submit(workflow.async_run, dag.init()).result()
    return [j for j in dag.jobs if j.rule.name not in SHARED or to_make(dag, j)]


def plan(workflow, sizing: Sizing, target: str = "all") -> list[Job]:
    """The plan's rows: every job of `target`, in the plan's reading order (cpuforge.catalogue.RULES)."""
    jobs = sorted(
        target_jobs(workflow, target), key=lambda j: sizing.plan_order(j.rule.name, dict(j.wildcards.items()))
    )
    return [r for j in jobs if (r := row(sizing, j))]


def show_plan(workflow, sizing: Sizing, tsv: str, log: str) -> None:
    """The plan of `all`, printed with the sentence of every job that this machine could not run; the table
    also goes to `log`, and as TSV to `tsv`."""
    jobs = plan(workflow, sizing)
    write_plan(jobs, tsv)
    memory, free = sizing.machine()
    refused = [s for job in jobs if (s := refusal(job, memory, free or free_disk_mb(job.output)))]
    text = plan_table(jobs) + "".join(f"here: {sentence}\n" for sentence in refused)
    Path(log).write_text(text)
    print(text, end="")


def preflight(workflow, sizing: Sizing) -> str | None:
    """The sentence that refuses a local run before any of its jobs runs, or None: the jobs the run will run
    (its DAG's), in the order they can run, held against this machine (Sizing.machine)."""
    memory_mb, free_mb = sizing.machine()
    dag = workflow.dag
    layers = dag.toposorted(set(dag.needrun_jobs()))
    return preflight_refusal(([r for j in layer if (r := row(sizing, j))] for layer in layers), memory_mb, free_mb)
