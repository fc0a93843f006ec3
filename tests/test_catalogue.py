"""The catalogue (cpuforge.catalogue) against the workflow's own text: its rules are the rules that run a step,
the rule files spell no artifact path of their own, and a GGUF's path reads back to what made it. The rule
files are read as text, so this runs in the fast loop."""

from __future__ import annotations

import ast
import re

import pytest
from helpers import REPO

from cpuforge import catalogue
from cpuforge.catalogue import BASE, MERGED, RULES, GgufName, parse_gguf
from cpuforge.sizing import jobs

WORKFLOW = sorted((REPO / "rules").glob("*.smk")) + [REPO / "Snakefile"]


def rule_blocks() -> dict[str, str]:
    """Every rule's text by name; a `use rule A as B with:` block is B's, with A's text before its own."""
    blocks = {}
    for path in WORKFLOW:
        for block in re.split(r"\n(?=\S)", path.read_text()):
            if m := re.match(r"rule (\w+):", block):
                blocks[m[1]] = block
            elif m := re.match(r"use rule (\w+) as (\w+) with:", block):
                blocks[m[2]] = blocks[m[1]] + block
    return blocks


def test_the_catalogue_is_a_leaf():
    tree = ast.parse((REPO / "cpuforge" / "catalogue.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("cpuforge")]


def test_its_rules_are_the_workflows_working_rules():
    """A rule that runs a step has its resources from the sizing; its figures need a function and a place in
    the plan, which the catalogue gives, so every such rule is there, and nothing else is."""
    working = {name for name, text in rule_blocks().items() if "resources:" in text}
    assert working == set(catalogue.RULE)
    assert len(RULES) == len(catalogue.RULE)  # each once
    for rule in RULES:
        assert callable(getattr(jobs, rule.need, None)), f"{rule.name}: cpuforge.sizing.jobs has no {rule.need}"
    assert set(jobs.NEEDS) == set(catalogue.RULE)


def test_each_benchmark_record_mirrors_its_log():
    """Snakemake's timing record of a job goes under logs/benchmarks/, named as the job's log."""
    for name, text in rule_blocks().items():
        logs = re.findall(r'log:\s+"logs/([^"]+)\.log"', text)
        records = re.findall(r'benchmark:\s+"([^"]+)\.tsv"', text)
        if "resources:" in text:
            assert records and records[-1] == f"logs/benchmarks/{logs[-1]}", name


@pytest.mark.parametrize("path", WORKFLOW, ids=lambda p: p.name)
def test_the_rules_spell_no_artifact_path_nor_read_raw_config(path):
    """Paths under results/ come from the catalogue, settings from the normalised spec (SPEC)."""
    lines = [line.split("#")[0] for line in path.read_text().splitlines() if not line.startswith(("from ", "import "))]
    code = "\n".join(lines)
    code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings
    assert not re.findall(r"results/|ggml-model|base-\{\w+\}\.gguf", code)
    assert not re.findall(r"config\[|\b(LLAMA|IMATRIX|EVAL|AUTO_QUANT|MODELS|QUANT_TYPES|COMMIT)\b", code)


@pytest.mark.parametrize("weights", [MERGED, BASE])
@pytest.mark.parametrize("stage", ["f16", "q4_0", "iq2_xxs", "auto"])
def test_a_gguf_path_reads_back(tmp_path, weights, stage):
    assert parse_gguf(catalogue.gguf("demo", stage, weights)) == GgufName("demo", stage, weights)
    assert parse_gguf(tmp_path / "m" / f"{weights}-{stage}.gguf") == GgufName("m", stage, weights)


@pytest.mark.parametrize("name", ["model.gguf", "ggml-model-q4_0.bin", "imatrix.gguf", "ggml-model-.gguf"])
def test_any_other_file_reads_as_none(name):
    assert parse_gguf(f"results/demo/{name}") is None
