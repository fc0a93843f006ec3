"""Every benchmark program imports, parses its flags and refuses a bad input with one sentence, before any work.

The programs themselves take minutes to hours and are run by hand; these smoke tests keep them runnable
(`soak.py` once could not even import). A new `benchmarks/*.py` is picked up here by the glob.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers import REPO

PROGRAMS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")


def run(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{program}", *args], cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip


def test_every_benchmark_is_covered():
    assert {"build", "merge", "scale", "serve", "soak"} <= set(PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_shows_the_programs_own_description(program):
    result = run(program, "--help")
    assert result.returncode == 0, result.stderr
    doc = ast.get_docstring(ast.parse((REPO / "benchmarks" / f"{program}.py").read_text()))
    # argparse prints the module docstring as its description: the program's own first line, not a generic usage
    assert result.stdout.startswith("usage: ") and doc.splitlines()[0] in result.stdout


# only inputs that each program checks before it builds, downloads or starts anything
@pytest.mark.parametrize("program", ["build", "serve", "soak"])
def test_a_missing_model_is_refused_with_one_sentence(program, tmp_path):
    missing = tmp_path / "nowhere.gguf"
    result = run(program, str(missing), "--threads", "1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(f"{missing}: file not found.")


def test_soak_refuses_no_clients(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")  # only its existence is checked before the figures are
    result = run("soak", str(model), "--clients", "0")
    assert result.returncode != 0
    assert "--clients must be at least 1 and --minutes above 0, got 0 and 4.0." in result.stderr


def test_scale_refuses_an_unknown_shape():
    result = run("scale", "--shape", "70b-please")
    assert result.returncode == 2 and "invalid choice: '70b-please'" in result.stderr


def test_auto_quant_refuses_a_ladder_without_q4_0_before_any_work(tmp_path):
    result = run("auto_quant", "--workdir", str(tmp_path), "--types", "iq4_nl", "--listed", "q8_0")
    assert result.returncode == 2 and "--types or --listed must hold q4_0" in result.stderr
    result = run("auto_quant", "--workdir", str(tmp_path), "--types", "q4_0", "q4_k_m")
    assert result.returncode == 2 and "--types q4_k_m: not a ladder type" in result.stderr
    result = run("auto_quant", "--workdir", str(tmp_path), "--listed", "q4_zz")
    assert result.returncode == 2 and "--listed q4_zz: not a llama-quantize type." in result.stderr
