"""The search run for real: the candidates' speed screened side by side (screen.py), each made and verified end
to end in the objective's order until the rest cannot be chosen, searched mixes below the best, the passing files
benched again side by side, whole, and the choice.

The candidates:
- every ladder type as a uniform file: llama-quantize --pure with the importance matrix, every matrix in the
  type as far as its rows allow (llama-quantize's own fallback for rows that are not whole blocks);
- every type of quant_types as llama-quantize makes it (its own mix for the type), with the importance
  matrix where the type takes one and without it where the type does not need one;
- mixes of the frontier (frontier.py) below the best file that passes, searched as search.py does: for
  `size` over every ladder type, for `speed` over the types whose uniform file ties the fastest passing one.

A candidate is verified as the report measures a quant: KL divergence and perplexity against the f16 GGUF on the
held-out text (stopped once its windows so far decide it: search.decided_early), then, where those pass, its
answers against the f16 GGUF's on the held-out rows, teacher-forced (cpuforge.evaluate.task.fidelity_gguf); the
gate (cpuforge.evaluate.gate) judges the figures. A candidate's file is made only when it is verified, so a
pruned one costs its screen file alone. Files are written beside the output under its partial name and deleted
when the search ends; mixes' quantized tensors are kept while it lasts (tensors.py), so a mix made again is a
copy.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cpuforge.autoquant import decide
from cpuforge.autoquant.frontier import Frontier, sweep
from cpuforge.autoquant.screen import cut_layers, n_layers, write_screen
from cpuforge.autoquant.search import chosen, decided_early, first_probe, search
from cpuforge.autoquant.sensitivity import Option, quantizable
from cpuforge.autoquant.tensors import Tensors
from cpuforge.constants import MIB
from cpuforge.errors import GateError
from cpuforge.evaluate.bench import bench_side_by_side
from cpuforge.evaluate.fidelity import compare
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.perplexity import kl_divergence, ppl_increase_pct
from cpuforge.evaluate.task import fidelity_gguf
from cpuforge.io.gguf import read_header, row_bytes
from cpuforge.llama.ggml import ggml_type, type_name
from cpuforge.llama.quant import candidate_files, planned_types, run_quantize

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What the candidates are made and measured from, and how they are judged."""

    llama_bin: Path
    f16: Path
    imatrix: Path | None
    tensors: Tensors  # the f16 GGUF's matrices, quantized as the mixes ask
    logits: Path  # the f16 GGUF's log-probabilities on the held-out text (eval_perplexity --save-logits)
    ctx: int
    merged: Path  # the tokenizer the task's prompts are built with
    rows: list[dict]  # the task's held-out rows; empty without a task
    max_new_tokens: int
    threads: int
    scratch: Path  # the candidates' files are named after it
    gate: Gate
    objective: str
    tolerance: float  # speeds within this fraction of the faster are a tie
    gen_tokens: int  # llama-bench's generation test, at least (bench_side_by_side)
    repetitions: int
    reference: dict | None  # the f16 GGUF's answers as token ids, and which are right (evaluate.task.read_answers)
    given: dict[str, Path] = field(default_factory=dict)  # candidate name -> the workflow's file of a listed type
    files: dict[str, Path] = field(default_factory=dict)  # candidate name -> its file while the search lasts
    plans: dict[str, dict] = field(default_factory=dict)  # candidate name -> each tensor's type (planned_types)

    def path(self, name: str) -> Path:
        return self.scratch.with_name(f"{self.scratch.name}.{re.sub(r'[^A-Za-z0-9_]+', '-', name)}.gguf")


def figures(tensors: dict, types: dict[str, str], size_bytes: int) -> dict:
    """A candidate's size, its matrices' bits per weight and bytes, and their types (a recipe): `tensors` the
    f16 GGUF's header, `types` each matrix's ggml type, `size_bytes` the file's."""
    matrices = {n: t for n, t in tensors.items() if quantizable(n, t.shape)}
    matrix_bytes = sum(t.n_elements // t.shape[0] * row_bytes(ggml_type(types[n]), t.shape[0])
                       for n, t in matrices.items())  # fmt: skip
    return {"size_bytes": size_bytes, "tensor_bytes": matrix_bytes,
            "bpw": 8 * matrix_bytes / sum(t.n_elements for t in matrices.values()),
            "types": {n: types[n] for n in matrices}}  # fmt: skip


def file_figures(gguf: Path) -> dict:
    """A written candidate's figures (figures), from its header."""
    tensors = read_header(gguf).tensors
    return figures(tensors, {n: type_name(ggml_type(t.type)) for n, t in tensors.items()}, gguf.stat().st_size)


def plan_files(inp: Inputs, ladder: list[str], listed: list[str]) -> list[dict]:
    """The uniform and listed candidates, each with the types llama-quantize would give its tensors and the
    size they make (llama-quantize --dry-run: nothing written yet), or a listed type's file's own where the
    workflow made it."""
    tensors = read_header(inp.f16).tensors
    fixed = inp.f16.stat().st_size - sum(t.n_bytes for n, t in tensors.items() if quantizable(n, t.shape))
    candidates = []
    for name, kind, qtype, imatrix, pure in candidate_files(ladder, listed, inp.imatrix is not None):
        plan = planned_types(inp.llama_bin, inp.f16, qtype, inp.imatrix if imatrix else None, pure)
        inp.plans[name] = plan
        c = {"name": name, "kind": kind, "qtype": qtype, "imatrix": imatrix, "pure": pure,
             **figures(tensors, plan, 0)}  # fmt: skip
        c["size_bytes"] = fixed + c["tensor_bytes"]
        if name in inp.given:
            c.update(file_figures(inp.given[name]), from_workflow=True)
        candidates.append(c)
    return candidates


def made(inp: Inputs, c: dict) -> Path:
    """Candidate `c`'s file: the workflow's where it made it (a listed type), else written the first time it is
    asked for, from the tensors quantized once (tensors.py: the bytes llama-quantize writes for its planned
    types), or by llama-quantize where it is made without the search's importance matrix."""
    if c["name"] in inp.given:
        return inp.given[c["name"]]
    if c["name"] not in inp.files:
        started, out = time.monotonic(), inp.path(c["name"])
        if c["imatrix"] == (inp.imatrix is not None):  # its planned types, from the tensors the mixes share
            inp.tensors.write(c["types"], out, {"candidate": c["name"]}, c["qtype"])
        else:
            run_quantize(inp.llama_bin, inp.f16, out, c["qtype"], inp.threads, None, pure=c["pure"])
        inp.files[c["name"]] = out
        c.update(file_figures(out), make_seconds=round(time.monotonic() - started, 1))
        log.info("made %s: %.1f MiB in %.0f s", c["name"], c["size_bytes"] / MIB, c["make_seconds"])
    return inp.files[c["name"]]


def measure_screen(inp: Inputs, candidates: list[dict]) -> None:
    """Every candidate's generation tokens/s on its screen file (screen.py), side by side in one llama-bench run."""
    tensors = read_header(inp.f16).tensors
    layers = cut_layers({n: t.shape for n, t in tensors.items()}, n_layers(tensors))
    log.info("screen: %d candidates on %d of the %d layers", len(candidates), len(layers), n_layers(tensors))
    files = [inp.path(f"screen {c['name']}") for c in candidates]
    try:
        for c, path in zip(candidates, files, strict=True):
            write_screen(inp.f16, path, inp.plans[c["name"]], layers)
        rows = bench_side_by_side(inp.llama_bin, files, inp.threads, inp.gen_tokens, inp.repetitions)
    finally:
        for path in files:
            path.unlink(missing_ok=True)
    for c, row in zip(candidates, rows, strict=True):
        c.update(screen_tg_tps=row["tg_tps"], screen_tg_tps_std=row["tg_tps_std"], screen_tg_tokens=row["tg_tokens"],
                 screen_layers=len(layers))  # fmt: skip


def measure_speed(inp: Inputs, candidates: list[dict]) -> None:
    """Generation tokens/s of `candidates`' whole files, side by side in one llama-bench run."""
    rows = bench_side_by_side(inp.llama_bin, [made(inp, c) for c in candidates], inp.threads, inp.gen_tokens,
                              inp.repetitions)  # fmt: skip
    for c, row in zip(candidates, rows, strict=True):
        c.update(row)


def measure_kl(inp: Inputs, gguf: Path, stop: Callable[[dict], object] | None) -> dict:
    """A file's KL divergence figures against the f16 logits (the perplexity among them)."""
    kl = kl_divergence(inp.llama_bin, gguf, inp.logits, inp.ctx, inp.threads, stop=stop)
    return {"kl": kl, "kl_divergence": kl["kl_divergence"], "kl_divergence_err": kl.get("kl_divergence_err", 0.0),
            "top1_agreement": kl["top1_agreement"],
            "ppl_increase_pct": ppl_increase_pct(kl)}  # fmt: skip


def measure_fidelity(inp: Inputs, gguf: Path) -> dict:
    """A file's answers against the f16 GGUF's on the held-out rows: agreement, flips, their bounds, accuracy."""
    rows = fidelity_gguf(gguf, inp.llama_bin, inp.merged, inp.rows, inp.max_new_tokens, inp.threads, inp.reference)
    f = compare(inp.reference["right"], rows["right"], rows["agree"], inp.gate.confidence)
    return {"fidelity": f, "per_row": rows, "accuracy": sum(rows["right"]) / len(rows["right"]),
            "correct": sum(rows["right"]), "rows": len(rows["right"])}  # fmt: skip


def verify(inp: Inputs, c: dict, whole: bool = False) -> None:
    """Candidate `c` measured and judged in place: KL first (stopped once it is decided), the answers where it
    passes; `whole`, every figure measured whatever the first ones say (a size limit's one candidate, which the
    report judges)."""
    started = time.monotonic()
    gguf = made(inp, c)
    c.update(measure_kl(inp, gguf, None if whole else partial(decided_early, inp.gate)))
    if inp.rows and (whole or not inp.gate.misses(c)):
        c.update(measure_fidelity(inp, gguf))
    misses = inp.gate.misses(c)
    c.update(passed=not misses, misses=misses, verified=True, seconds=round(time.monotonic() - started, 1))
    f = c.get("fidelity")
    why = c["kl"].get("stopped_early")
    stopped = f" (stopped after {c['kl']['windows']} windows: {why})" if why else ""
    log.info("%s: KL %.4f, perplexity %+.1f %%%s%s: %s (%.0f s)", c["name"], c["kl_divergence"], c["ppl_increase_pct"],
             stopped, f", {f['agree']}/{f['rows']} answers as f16's, {f['worse']} right->wrong, {f['better']} "
             "wrong->right" if f else "", "passes" if c["passed"] else "; ".join(c["misses"]), c["seconds"])  # fmt: skip


def verify_in_order(inp: Inputs, candidates: list[dict]) -> None:
    """Every candidate verified, the objective's best first, except those a passing one already beats."""
    done: list[dict] = []
    for c in decide.order(candidates, inp.objective, decide.SCREEN):
        by = decide.beaten_by(c, done, inp.objective, inp.tolerance, decide.SCREEN)
        if by is not None:
            c.update(verified=False, passed=None, pruned_by=by["name"])
            continue
        verify(inp, c)
        done.append(c)


def restricted(table: dict[str, list[Option]], allowed: set[str]) -> dict[str, list[Option]]:
    """Each tensor's options in the allowed types; a tensor none fits keeps its largest option."""
    return {name: [o for o in options if o.type in allowed] or [max(options, key=lambda o: o.bytes)]
            for name, options in table.items()}  # fmt: skip


def make_mix(inp: Inputs, frontier: Frontier, k: int, point: int) -> dict:
    """Point k of `frontier` written as a candidate, named by `point`, its place on the whole frontier."""
    name = f"mix {point}"
    inp.files[name] = inp.path(name)
    inp.tensors.write({n: o.type for n, o in frontier.mix(k).items()}, inp.files[name], {"candidate": name})
    return {"name": name, "kind": "mix", "qtype": None, "imatrix": inp.imatrix is not None, "point": point,
            "loss": frontier.loss(k), **file_figures(inp.files[name])}  # fmt: skip


def search_mixes(inp: Inputs, table: dict[str, list[Option]], candidates: list[dict], budget: int) -> list[dict]:
    """Mixes below the best passing file, searched on the frontier of the types the objective allows; every mix
    measured, as candidates."""
    best = decide.choose(candidates, inp.objective, inp.tolerance, decide.SCREEN)
    if best is None or budget < 1:
        return []
    allowed = set(table_types(table))
    if inp.objective == "speed":
        allowed = {c["name"].removeprefix("uniform ") for c in candidates if c["kind"] == "uniform"
                   and not decide.faster(best, c, inp.tolerance, decide.SCREEN)}  # fmt: skip
    frontier = sweep(restricted(table, allowed))
    start = next((k for k in range(len(frontier)) if frontier.bytes(k) < best["tensor_bytes"]), None)
    if start is None:
        log.info("mixes: none of %s is smaller than %s", ", ".join(sorted(allowed)), best["name"])
        return []
    below = frontier.tail(start)
    log.info("mixes of %s below %s: %d points, %.1f to %.1f MiB of matrices", ", ".join(sorted(allowed)),
             best["name"], len(below), below.bytes(0) / MIB, below.bytes(len(below) - 1) / MIB)  # fmt: skip

    made: dict[int, dict] = {}

    def measured(k: int) -> dict:
        started = time.monotonic()
        made[k] = make_mix(inp, below, k, start + k)
        figures = measure_kl(inp, inp.files[made[k]["name"]], partial(decided_early, inp.gate))
        return {**figures, "seconds": round(time.monotonic() - started, 1)}

    def tasked(k: int, figures: dict) -> dict:
        started = time.monotonic()
        out = measure_fidelity(inp, inp.files[made[k]["name"]])
        return {**out, "seconds": round(figures["seconds"] + time.monotonic() - started, 1)}

    results = search(below, measured, tasked, inp.gate, first_probe(below, inp.gate), budget, task=bool(inp.rows))
    mixes = [{**made[k], **r, "verified": True} for k, r in sorted(results.items(), key=lambda item: item[1]["order"])]
    smallest = chosen(results)
    for m in mixes:
        if m["passed"] and smallest is not None and m["point"] != start + smallest:
            # passed on KL; its answers were not measured, since a smaller mix of the same types passes
            m.update(passed=False, verified=False, pruned_by=f"mix {start + smallest}")
    return mixes


def table_types(table: dict[str, list[Option]]) -> list[str]:
    return sorted({o.type for options in table.values() for o in options})


def decide_file(inp: Inputs, table: dict[str, list[Option]], ladder: list[str], listed: list[str],
                budget: int) -> tuple[dict, list[dict]]:  # fmt: skip
    """The candidate to ship and every candidate measured (GateError when none passes)."""
    candidates = plan_files(inp, ladder, listed)
    measure_screen(inp, candidates)
    verify_in_order(inp, candidates)
    mixes = search_mixes(inp, table, candidates, budget)
    candidates += mixes
    finalists = [c for c in candidates if c.get("passed")]
    if finalists:  # the passing files side by side again, whole: the choice is made there
        measure_speed(inp, finalists)
    best = decide.choose(candidates, inp.objective, inp.tolerance)
    decide.mark_dominated(candidates)
    if best is None:
        verified = [c for c in candidates if c.get("verified")]
        r = min(verified, key=lambda c: (len(c["misses"]), c["kl_divergence"]))
        raise GateError(f"auto_quant: no candidate passes eval.gate ({len(verified)} measured); the best, {r['name']} "
                        f"({r['size_bytes'] / MIB:.1f} MiB, {r['bpw']:.2f} bpw), misses {'; '.join(r['misses'])}.")  # fmt: skip
    return best, candidates


def within_size(inp: Inputs, frontier: Frontier, max_bytes: int) -> tuple[dict, list[dict]]:
    """The least lossy mix within `max_bytes` of matrices, measured and kept whatever the gate says (the report
    judges it)."""
    k = frontier.largest_within(max_bytes)
    if k is None:
        raise GateError(f"auto_quant: even the smallest mix ({frontier.bytes(len(frontier) - 1) / MIB:.1f} MiB "
                        f"of tensors) is larger than the size asked for ({max_bytes / MIB:.1f} MiB).")  # fmt: skip
    c = make_mix(inp, frontier, k, k)
    verify(inp, c, whole=True)
    measure_speed(inp, [c])
    c["dominated_by"] = None
    return c, [c]


def kind_of(tensor: str) -> str:
    """A tensor's kind, its layer left out: blk.3.ffn_down.weight -> ffn_down."""
    return re.sub(r"^blk\.\d+\.", "", tensor).removesuffix(".weight")


def noise_by_kind(table: dict[str, list[Option]], kind: str = "q4_0") -> dict[str, float]:
    """Each tensor kind's median relative output noise in one type (q4_0 fits every row length): which
    kinds the sensitivity found fragile."""
    by_kind: dict[str, list[float]] = {}
    for name, options in table.items():
        for o in options:
            if o.type == kind:
                by_kind.setdefault(kind_of(name), []).append(o.error)
    return {k: float(statistics.median(v)) for k, v in sorted(by_kind.items())}


def summary(best: dict, candidates: list[dict], table: dict[str, list[Option]], inp: Inputs, budget: int,
            max_bytes: int | None, seconds: float, cpu: dict) -> dict:  # fmt: skip
    """The search record: what was asked, every candidate measured (its per-row answers included), the chosen
    one and its types by tensor kind (and each kind's noise in q4_0), and the CPU the speeds were measured on."""
    by_kind: dict[str, Counter] = {}
    for name, kind in best["types"].items():
        by_kind.setdefault(kind_of(name), Counter())[kind] += 1
    objective = inp.objective if max_bytes is None else f"least lossy mix within {max_bytes / MIB:.1f} MiB of tensors"
    return {
        "objective": objective,
        "gate": inp.gate.__dict__,
        "tolerance": inp.tolerance,
        "bench": {"threads": inp.threads, "gen_tokens": inp.gen_tokens, "repetitions": inp.repetitions, **cpu},
        "budget": budget,
        "seconds": round(seconds, 1),
        "reference": inp.reference,
        "chosen": best["name"],
        "candidates": [{k: v for k, v in c.items() if k != "types"} for c in candidates],
        "types_by_kind": {kind: dict(sorted(c.items())) for kind, c in sorted(by_kind.items())},
        "q4_0_noise_by_kind": noise_by_kind(table),
        "recipe": best["types"],
    }
