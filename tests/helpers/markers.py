"""What a test needs, derived from its code so the markers cannot drift: `llama` where the test's fixture closure
holds `llama_bin` (the pinned build), `workflow` where the test or a fixture it uses runs Snakemake, `unit` where
neither holds and the test is not marked `slow` (minutes of compute or a download: the fast loop leaves it out). conftest.py marks every test so; a test that carries an explicit marker the derivation contradicts
fails with one sentence saying why."""

from __future__ import annotations

import inspect
import types

import pytest

from helpers import llama, vocab, workflow

NEEDS = ("unit", "llama", "workflow")
# the fixture that makes the build: it runs Snakemake too, but only as the build's means (a `llama` test)
BUILD_FIXTURE = "llama_bin"
# what only the build (or the source it fetches) gives: a function reaching one of these needs `llama_bin`
BUILD_OBJECTS = (llama.BIN, llama.SOURCE, vocab.MODELS_DIR)


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _constants(code: types.CodeType):
    # a list of constants compiles to one tuple constant: ["python", "-m", "snakemake"]
    stack = list(code.co_consts)
    while stack:
        const = stack.pop()
        if isinstance(const, (tuple, frozenset)):
            stack.extend(const)
        else:
            yield const


def _ours(obj) -> bool:
    """A function of the test suite (a test module, conftest or helpers), whose body is followed in turn."""
    module = getattr(obj, "__module__", "") or ""
    return inspect.isfunction(obj) and (module.split(".")[0] in ("conftest", "helpers") or module.startswith("test_"))


def reaches(func, found, seen: set | None = None) -> bool:
    """Whether `func`, or a function of the suite it names, names an object `found` accepts (followed by name
    through module globals: what a test calls is what it imports or defines)."""
    seen = set() if seen is None else seen
    func = inspect.unwrap(func)
    if func in seen or not hasattr(func, "__code__"):
        return False
    seen.add(func)
    for code in _code_objects(func.__code__):
        if any(isinstance(c, str) and found(c) for c in _constants(code)):
            return True
        # a name may be a global, or an attribute of a module the code names (`llama.BIN`)
        modules = [m for n in code.co_names if inspect.ismodule(m := func.__globals__.get(n))]
        for name in code.co_names:
            for obj in (func.__globals__.get(name), *(getattr(m, name, None) for m in modules)):
                if obj is not None and (found(obj) or (_ours(obj) and reaches(obj, found, seen))):
                    return True
    return False


def _runs_snakemake(obj) -> bool:
    # the helper, or a subprocess started as `python -m snakemake` / `snakemake`
    return obj is workflow.snakemake or (isinstance(obj, str) and obj == "snakemake")


def _uses_the_build(obj) -> bool:
    return any(obj is b for b in BUILD_OBJECTS)


def _fixture_functions(item) -> dict[str, object]:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs if info is not None else {}
    return {name: d[-1].func for name, d in defs.items() if d}


def derived_marks(item) -> set[str]:
    """The markers a test item needs, from its fixture closure and the code it and its fixtures run; none for a
    `slow` test that needs neither the build nor Snakemake (it is not for the fast loop)."""
    fixtures = _fixture_functions(item)
    functions = [item.function, *(f for name, f in fixtures.items() if name != BUILD_FIXTURE)]
    needs = set()
    if BUILD_FIXTURE in item.fixturenames or any(reaches(f, _uses_the_build) for f in functions):
        needs.add("llama")
    if any(reaches(f, _runs_snakemake) for f in functions):
        needs.add("workflow")
    if needs or item.get_closest_marker("slow"):
        return needs
    return {"unit"}


def explicit_marks(item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in NEEDS}


def contradiction(item, explicit: set[str], derived: set[str]) -> str | None:
    """One sentence if the explicit markers disagree with what the test needs; None if they agree.

    Explicit markers are honoured where they only leave out part of a need (a `llama` test whose fixture also runs
    Snakemake gets `workflow` added); they contradict the derivation where they claim a need it does not find, or
    `unit` for a test that needs the build or a Snakemake run.
    """
    name = item.nodeid
    if "llama" in derived and BUILD_FIXTURE not in item.fixturenames:
        return (f"{name} uses the llama.cpp build or its source without asking for the {BUILD_FIXTURE} fixture, "
                "so it fails wherever the build has not been made yet.")  # fmt: skip
    if not explicit:
        return None
    if "unit" in explicit and derived != {"unit"}:
        return f"{name} is marked unit but needs {' and '.join(sorted(derived)) or 'minutes (it is marked slow)'}."
    if claimed := explicit - derived - {"unit"}:
        return (f"{name} is marked {' and '.join(sorted(claimed))} but its code and fixtures need "
                f"{' and '.join(sorted(derived)) or 'neither'}.")  # fmt: skip
    return None


def mark(items) -> dict[str, str]:
    """Add to every test the markers it needs; return the contradictions by node id."""
    wrong = {}
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        explicit, derived = explicit_marks(item), derived_marks(item)
        if message := contradiction(item, explicit, derived):
            wrong[item.nodeid] = message
        for name in sorted(derived - explicit):
            item.add_marker(name)
    return wrong
