"""Running the workflow as a user does: a config file and `snakemake` in a working directory of the test's own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import REPO
from helpers.llama import BUILD_DIR, FLAVOUR

# the demo task's data, as a model's `task_data`
TASK = {split: str(REPO / "data" / "demo_task" / f"{split}.jsonl") for split in ("train", "heldout")}


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict | None = None, umask: int = -1
) -> subprocess.CompletedProcess:
    """Run the workflow in `workdir` as a user would (under `umask`, if given); output captured for the assertions."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, umask=umask)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs a dry run would execute, by rule, read from Snakemake's job stats table."""
    out = snakemake(workdir, "-n", *args).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.M) if m[1] != "total"}


def write_config(path: Path, models: list[dict], **extra) -> Path:
    import yaml

    config = {"models": models, "llama_cpp": {"build_dir": str(BUILD_DIR), "cpu": FLAVOUR}, **extra}
    path.write_text(yaml.safe_dump(config))
    return path
