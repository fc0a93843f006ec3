"""The conda environments pin the same versions as requirements.txt, so `--sdm conda` runs match."""

import yaml
from helpers import REPO

# these run in the Snakemake process itself (and in its copy inside each SLURM job), never in a rule's env
SNAKEMAKE_SIDE = {
    "snakemake",
    "jsonschema",
    "snakemake-executor-plugin-slurm",
    "snakemake-executor-plugin-slurm-jobstep",
    "aiohttp",  # scripts.serve's proxy: serving a model is no rule's job
}


def pins(lines):
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_conda_env_pins_match_requirements():
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "envs" / "torch.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    in_env = pins(pip)
    assert in_env == {k: v for k, v in required.items() if k not in SNAKEMAKE_SIDE}
