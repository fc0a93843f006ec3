"""Which point of the frontier to ship: candidates verified end to end until the gate decides.

A candidate is one point of the frontier (frontier.py) made from its recipe (tensors.py), then
measured as the report measures a quant: KL divergence and perplexity against the f16 GGUF on the held-out
text, and task accuracy on the held-out rows. Mixes down the frontier lose more and more, so whether a
point passes the gate is taken as monotone in it: the search keeps the smallest point known to pass and
the largest known to fail, and probes between them.

The probes are measured against the f16 logits only; the task (each held-out prompt with its answer in one
batch, teacher-forced: cpuforge.evaluate.task.right_gguf) runs once the bracket is closed, on the smallest
point that passed: where its accuracy misses, that point fails and the search goes on above it (the next larger
point that passed, or new probes while the budget lasts). So a search of three probes whose choice keeps
the task's accuracy runs the task once.

The first probe is the point that a KL divergence of 0.3 per unit of loss predicts within 85 % of the
gate's KL divergence: the factor measured along the frontier on the demo (0.23-0.32) and at the 1B shape
(0.31-0.34), a prior, so that the first candidate lands near the gate rather than at a fixed size that every
model passes with room to spare (at 4.5 bpw, the demo's KL was half the gate's and the 1B shape's 40 %:
two more candidates, each a KL run and its tensors quantized, to get down to the gate). After it, the KL
divergence of a point is predicted as proportional to its loss, the factor fitted on every point measured
so far (median), and the next probe is the smallest point predicted to stay within the margin; where that
guess lands at the smallest point known to pass, the probe is a step of 3 % of its bytes below it (a mix
that shares most of its tensors' types, so cheap to make); where it lands at the largest point known to
fail, or the last miss was accuracy or perplexity (which the loss does not predict), the probe halves the
bracket's bytes instead. It stops when the smallest point known to pass is within the margin (no room is
predicted below it), when the bracket is within 1 % of the file's bytes, or when the budget of candidates
is spent.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from cpuforge.autoquant.frontier import Frontier

PRIOR_KL_PER_LOSS = 0.3  # the first probe's prediction, before any point is measured
KL_MARGIN = 0.85
RESOLUTION = 0.01
EDGE_STEP = 0.03  # of the file's bytes: the step past the smallest passing point when the limit is predicted at it


@dataclass(frozen=True)
class Gate:
    """eval.gate's thresholds; min_accuracy None when the model has no task."""

    max_kl_divergence: float
    max_ppl_increase_pct: float
    min_accuracy: float | None

    def misses(self, figures: dict) -> list[str]:
        """The gate's figures that `figures` (kl_divergence, ppl_increase_pct, accuracy) miss, as
        `name value > limit` phrases; empty when it passes."""
        out = []
        if figures["kl_divergence"] > self.max_kl_divergence:
            out.append(f"KL divergence {figures['kl_divergence']:.4g} > max_kl_divergence {self.max_kl_divergence:g}")
        if figures["ppl_increase_pct"] > self.max_ppl_increase_pct:
            out.append(f"perplexity +{figures['ppl_increase_pct']:.1f}% > max_ppl_increase_pct "
                       f"{self.max_ppl_increase_pct:g}%")  # fmt: skip
        if self.min_accuracy is not None and "accuracy" in figures and figures["accuracy"] < self.min_accuracy:
            out.append(f"task accuracy {figures['accuracy']:.3f} < min_accuracy {self.min_accuracy:g}")
        return out


def predicted(frontier: Frontier, factor: float, gate: Gate) -> int:
    """The smallest point whose KL divergence, `factor` x its loss, is predicted within the margin of the gate's
    (-1 when none is: losses rise along the frontier)."""
    losses = [frontier.loss(k) for k in range(len(frontier))]
    return bisect.bisect_right(losses, KL_MARGIN * gate.max_kl_divergence / factor) - 1


def first_probe(frontier: Frontier, gate: Gate) -> int:
    return max(0, predicted(frontier, PRIOR_KL_PER_LOSS, gate))


def point_of_bytes(frontier: Frontier, target: float, lo: int, hi: int) -> int:
    """The point strictly between `lo` and `hi` whose bytes are nearest `target`."""
    points = range(lo + 1, hi)
    return min(points, key=lambda k: (abs(frontier.bytes(k) - target), k))


def kl_factor(frontier: Frontier, results: dict[int, dict]) -> float | None:
    ratios = [r["kl_divergence"] / frontier.loss(k) for k, r in results.items() if frontier.loss(k) > 0]
    return statistics.median(ratios) if ratios else None


def next_probe(frontier: Frontier, results: dict[int, dict], gate: Gate, first: int) -> int | None:
    """The next point to measure, or None when the bracket is closed."""
    if not results:
        return first
    lo = max((k for k, r in results.items() if r["passed"]), default=-1)
    hi = min((k for k, r in results.items() if not r["passed"] and k > lo), default=len(frontier))
    if hi - lo <= 1:
        return None
    if lo >= 0 and results[lo]["kl_divergence"] >= KL_MARGIN * gate.max_kl_divergence:
        return None  # the smallest passing point is within the margin: no room predicted below it
    top = frontier.bytes(max(lo, 0))
    if lo >= 0 and hi < len(frontier) and top - frontier.bytes(hi) <= RESOLUTION * top:
        return None
    bottom = frontier.bytes(hi) if hi < len(frontier) else frontier.bytes(len(frontier) - 1)
    halve = point_of_bytes(frontier, (top + bottom) / 2, lo, hi)
    last = results[max(results, key=lambda k: results[k]["order"])]
    factor = kl_factor(frontier, results)
    if factor is None or (not last["passed"] and last["kl_divergence"] <= gate.max_kl_divergence):
        return halve
    guess = predicted(frontier, factor, gate)
    if lo >= 0 and guess <= lo + 1:
        # the limit predicted at the smallest point that passed: a short step past it, whose mix shares most
        # of its tensors' types (cheap to make), rather than a jump to the middle of the bracket
        return point_of_bytes(frontier, top * (1 - EDGE_STEP), lo, hi)
    if guess <= lo or guess >= hi or guess == hi - 1:
        return halve
    return guess


def search(frontier: Frontier, measure: Callable[[int], dict], measure_task: Callable[[int, dict], dict],
           gate: Gate, first: int, budget: int) -> dict[int, dict]:  # fmt: skip
    """Measure points (`measure(k)`: the figures against the f16 logits of point k) until the bracket closes or
    `budget` candidates are spent, then the task (`measure_task(k, figures so far)`: its accuracy) on the
    smallest that passed, going on above it while the accuracy misses; every result, by point, with
    `passed`, `misses` and `order` (its last measurement's place). Without a task (gate.min_accuracy None)
    the first part decides."""
    results: dict[int, dict] = {}
    steps = 0
    while True:
        k = next_probe(frontier, results, gate, first) if len(results) < budget else None
        if k is None:
            k = chosen(results)
            if k is None or gate.min_accuracy is None or "accuracy" in results[k]:
                return results
            figures = {**results[k], **measure_task(k, results[k])}
        else:
            figures = measure(k)
        misses = gate.misses(figures)
        results[k] = {**figures, "passed": not misses, "misses": misses, "order": steps}
        steps += 1


def chosen(results: dict[int, dict]) -> int | None:
    """The smallest point that passed (the task's accuracy not yet measured, or within the gate)."""
    return max((k for k, r in results.items() if r["passed"]), default=None)
