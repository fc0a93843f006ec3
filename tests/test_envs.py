"""The conda environments pin the same versions as requirements.txt, so `--sdm conda` runs match."""

import yaml
from conftest import REPO


def pins(lines):
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_conda_env_pins_match_requirements():
    required = pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "envs" / "torch.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    in_env = pins(pip)
    # snakemake and jsonschema run the workflow itself; aiohttp serves a model, which no rule does
    assert in_env == {k: v for k, v in required.items() if k not in ("snakemake", "jsonschema", "aiohttp")}
