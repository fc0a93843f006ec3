"""The markers say what each test needs, and the suite's layout holds: helpers in helpers/, fixtures in conftest."""

from __future__ import annotations

import ast
import types

import pytest
from helpers import REPO
from helpers import llama
from helpers.markers import NEEDS, contradiction, derived_marks, reaches
from helpers.workflow import planned_jobs, snakemake

TESTS = REPO / "tests"


def runs_the_workflow():
    snakemake(REPO, "-n")


def runs_it_through_a_helper():
    return planned_jobs(REPO, "all")


def runs_it_as_a_subprocess():
    return ["python", "-m", "snakemake", "--cores", "1"]


def needs_the_build():
    return llama.BIN / "llama-cli"


def needs_nothing():
    return sorted([3, 1, 2])


def is_snakemake(obj) -> bool:
    return obj is snakemake or obj == "snakemake"


# by name, so that this test's own code does not reach them (the derivation follows the functions a test names)
CONTROLS = {f.__name__: f for f in (runs_the_workflow, runs_it_through_a_helper, runs_it_as_a_subprocess,
                                    needs_the_build, needs_nothing)}  # fmt: skip


def test_the_derivation_sees_snakemake_however_it_is_called():
    assert reaches(CONTROLS["runs_the_workflow"], is_snakemake)
    assert reaches(CONTROLS["runs_it_through_a_helper"], is_snakemake)  # followed into helpers.workflow
    assert reaches(CONTROLS["runs_it_as_a_subprocess"], is_snakemake)
    assert not reaches(CONTROLS["needs_nothing"], is_snakemake)
    assert not reaches(CONTROLS["needs_the_build"], is_snakemake)
    # the path looked up by name: this test looks at where the build is, it does not use it
    assert reaches(CONTROLS["needs_the_build"], lambda obj: obj is getattr(llama, "BIN"))


def fake_item(fixturenames=(), nodeid="tests/test_x.py::test_y"):
    return types.SimpleNamespace(nodeid=nodeid, fixturenames=list(fixturenames))


def test_an_explicit_marker_that_contradicts_the_need_is_named():
    # positive controls: each wrong marking gets its sentence, each right one none
    unit_but_builds = contradiction(fake_item(["llama_bin"]), {"unit"}, {"llama"})
    assert unit_but_builds == "tests/test_x.py::test_y is marked unit but needs llama."
    claimed = contradiction(fake_item(), {"workflow"}, {"unit"})
    assert claimed == "tests/test_x.py::test_y is marked workflow but its code and fixtures need unit."
    hidden_build = contradiction(fake_item(), set(), {"llama"})
    assert "without asking for the llama_bin fixture" in hidden_build
    # honoured: a `llama` mark on a test whose fixture also runs Snakemake only leaves out part of the need
    assert contradiction(fake_item(["llama_bin"]), {"llama"}, {"llama", "workflow"}) is None
    assert contradiction(fake_item(), {"unit"}, {"unit"}) is None


def test_every_collected_test_carries_exactly_what_it_needs(request):
    for item in request.session.items:
        if not isinstance(item, pytest.Function):
            continue
        marks = {m.name for m in item.iter_markers() if m.name in NEEDS}
        assert marks == derived_marks(item), item.nodeid
        assert ("unit" in marks) == (marks == {"unit"}), item.nodeid


def test_this_test_is_a_unit_test(request):
    assert {m.name for m in request.node.iter_markers() if m.name in NEEDS} == {"unit"}


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_no_test_imports_conftest_or_another_test():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 20
    wrong = {f.name: sorted(m for m in imported_modules(f) if m == "conftest" or m.startswith("test_")) for f in files}
    assert {f: m for f, m in wrong.items() if m} == {}


def test_conftest_holds_fixtures_and_hooks_only():
    tree = ast.parse((TESTS / "conftest.py").read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions
    for f in functions:
        fixture = any("fixture" in ast.unparse(d) for d in f.decorator_list)
        assert fixture or f.name.startswith("pytest_"), f"conftest.py: {f.name} is neither a fixture nor a hook"
