"""The search run for real: each candidate made from its recipe (tensors.py: each tensor quantized in a
type once, as llama-quantize quantizes it), its types checked in the written header, and measured as the
report measures a quant.

A candidate's file is written beside the output under its partial name and deleted once measured (at the
7B shape each is gigabytes); the quantized tensors stay until the search ends, so making a candidate again,
for its task or as the chosen file, is a copy."""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cpuforge.autoquant.frontier import Frontier
from cpuforge.autoquant.search import Gate, chosen, clear_miss, first_probe, search
from cpuforge.autoquant.sensitivity import Option
from cpuforge.autoquant.tensors import Tensors
from cpuforge.errors import GateError
from cpuforge.evaluate.perplexity import kl_divergence
from cpuforge.evaluate.task import right_gguf
from cpuforge.sizing.costs import MIB

log = logging.getLogger(__name__)



@dataclass
class Inputs:
    """What a candidate is made and measured from."""

    llama_bin: Path
    tensors: Tensors  # the f16 GGUF's matrices, quantized as the candidates ask
    logits: Path  # the f16 GGUF's log-probabilities on the held-out text (eval_perplexity --save-logits)
    ctx: int
    merged: Path  # the tokenizer the task's prompts are built with
    rows: list[dict]  # the task's held-out rows; empty without a task
    max_new_tokens: int
    threads: int
    scratch: Path  # the candidates' files are named after it
    measured: int = 0


@contextmanager
def candidate(inp: Inputs, frontier: Frontier, k: int) -> Iterator[Path]:
    """Point k's file, made from its recipe, for as long as it is measured."""
    out = inp.scratch.with_name(f"{inp.scratch.name}.{k}.gguf")
    inp.tensors.write({name: o.type for name, o in frontier.mix(k).items()}, out, {"candidate": k})
    try:
        yield out
    finally:
        out.unlink()


def measure(inp: Inputs, frontier: Frontier, k: int, n_elements: int, stop: Callable[[dict], bool] | None) -> dict:
    """Point k made and measured against the f16 logits: its file's size and bits per weight, and the KL
    divergence's figures (the perplexity among them); with `stop`, over the windows up to the first where
    `stop(the figures so far)` is true."""
    started = time.monotonic()
    inp.measured += 1
    log.info("candidate %d: point %d of %d, %.1f MiB of matrices (%.2f bpw)", inp.measured, k, len(frontier),
             frontier.bytes(k) / MIB, 8 * frontier.bytes(k) / n_elements)  # fmt: skip
    with candidate(inp, frontier, k) as gguf:
        size = gguf.stat().st_size
        kl = kl_divergence(inp.llama_bin, gguf, inp.logits, inp.ctx, inp.threads, stop=stop)
    figures = {"point": k, "size_bytes": size, "tensor_bytes": frontier.bytes(k),
               "bpw": 8 * frontier.bytes(k) / n_elements, "loss": frontier.loss(k), "kl": kl,
               "kl_divergence": kl["kl_divergence"], "top1_agreement": kl["top1_agreement"],
               "ppl_increase_pct": (kl["perplexity"] / kl["f16_perplexity"] - 1) * 100,
               "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    log.info("point %d: %.1f MiB, %.2f bpw, KL %.4f, perplexity %+.1f %%%s, %.0f s", k, figures["size_bytes"] / MIB,
             figures["bpw"], kl["kl_divergence"], figures["ppl_increase_pct"],
             f" (stopped after {kl['windows']} windows: a clear miss)" if kl.get("stopped_early") else "",
             figures["seconds"])  # fmt: skip
    return figures


def measure_task(inp: Inputs, frontier: Frontier, k: int, seconds: float) -> dict:
    """Point k's task accuracy on the held-out rows, its file made again, by teacher forcing (right_gguf: a
    batch per row, not a pass per answer token); `seconds` the point's time so far."""
    started = time.monotonic()
    log.info("point %d: the task on %d held-out rows", k, len(inp.rows))
    with candidate(inp, frontier, k) as gguf:
        right = right_gguf(gguf, inp.llama_bin, inp.merged, inp.rows, inp.max_new_tokens, inp.threads)
    seconds += time.monotonic() - started
    log.info("point %d: accuracy %d/%d, %.0f s in all", k, sum(right), len(right), seconds)
    return {"accuracy": sum(right) / len(right), "correct": sum(right), "rows": len(right),
            "seconds": round(seconds, 1)}  # fmt: skip


def best_failure(results: dict[int, dict]) -> int:
    """The candidate closest to passing: the fewest misses, then the lowest KL divergence."""
    return min(results, key=lambda k: (len(results[k]["misses"]), results[k]["kl_divergence"]))


def run_search(inp: Inputs, frontier: Frontier, gate: Gate, n_elements: int, budget: int,
               max_bytes: int | None) -> tuple[int, dict[int, dict]]:  # fmt: skip
    """The chosen point and every candidate's figures (`n_elements`: the weights of the quantized matrices,
    for their bits per weight). With `max_bytes`, the least lossy point
    within it (one candidate, kept whatever the gate says: the report judges it); else the smallest point
    that passes the gate, GateError when none does."""
    def measured(k: int) -> dict:
        # a clear miss of the gate is stopped early; a candidate within a size limit is measured whole
        return measure(inp, frontier, k, n_elements, partial(clear_miss, gate) if max_bytes is None else None)

    def tasked(k: int, figures: dict) -> dict:
        return measure_task(inp, frontier, k, figures["seconds"])

    if max_bytes is not None:
        k = frontier.largest_within(max_bytes)
        if k is None:
            raise GateError(f"auto_quant: even the smallest mix ({frontier.bytes(len(frontier) - 1) / MIB:.1f} MiB "
                            f"of tensors) is larger than the size asked for ({max_bytes / MIB:.1f} MiB).")  # fmt: skip
        return k, search(frontier, measured, tasked, gate, k, 1)
    results = search(frontier, measured, tasked, gate, first_probe(frontier, gate), budget)
    k = chosen(results)
    if k is None:
        best = best_failure(results)
        r = results[best]
        raise GateError(f"auto_quant: no candidate passes eval.gate ({len(results)} measured); the best, point {best} "
                        f"({r['size_bytes'] / MIB:.1f} MiB, {r['bpw']:.2f} bpw), misses {'; '.join(r['misses'])}.")  # fmt: skip
    return k, results


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


def summary(frontier: Frontier, table: dict[str, list[Option]], results: dict[int, dict], k: int, gate: Gate,
            budget: int, max_bytes: int | None, seconds: float) -> dict:  # fmt: skip
    """The search record: what was asked, every candidate measured, the chosen mix by tensor kind and layer
    (and each kind's noise in q4_0, which is why), and the frontier (at most 200 of its points, for plots)."""
    mix = frontier.mix(k)
    by_kind: dict[str, Counter] = {}
    for name, option in mix.items():
        by_kind.setdefault(kind_of(name), Counter())[option.type] += 1
    every = max(1, len(frontier) // 200)
    points = sorted({*range(0, len(frontier), every), len(frontier) - 1})
    objective = ("smallest mix that passes eval.gate" if max_bytes is None
                 else f"least lossy mix within {max_bytes / MIB:.1f} MiB of tensors")  # fmt: skip
    candidates = [r for _, r in sorted(results.items(), key=lambda item: item[1]["order"])]
    return {
        "objective": objective,
        "gate": {"max_kl_divergence": gate.max_kl_divergence, "max_ppl_increase_pct": gate.max_ppl_increase_pct,
                 "min_accuracy": gate.min_accuracy},  # fmt: skip
        "budget": budget,
        "seconds": round(seconds, 1),
        "chosen": k,
        "candidates": candidates,
        "types_by_kind": {kind: dict(sorted(c.items())) for kind, c in sorted(by_kind.items())},
        "q4_0_noise_by_kind": noise_by_kind(table),
        "recipe": {name: o.type for name, o in mix.items()},
        "frontier": [[p, frontier.bytes(p), frontier.loss(p)] for p in points],
    }
