"""Which point of the frontier to ship: candidates verified end to end until the gate decides.

A candidate is one point of the frontier (frontier.py) made from its recipe (tensors.py), then
measured as the report measures a quant: KL divergence and perplexity against the f16 GGUF on the held-out
text, and task accuracy on the held-out rows. Mixes down the frontier lose more and more, so whether a
point passes the gate is taken as monotone in it: the search keeps the smallest point known to pass and
the largest known to fail, and probes between them.

The probes are measured against the f16 logits only; the task (each held-out prompt with its answer in one
batch, teacher-forced: cpuforge.evaluate.task.fidelity_gguf) runs once the bracket is closed, on the smallest
point that passed: where its accuracy misses, that point fails and the search goes on above it (the next larger
point that passed, or new probes while the budget lasts). So a search of three probes whose choice keeps
the task's accuracy runs the task once. A probe's KL run is stopped as soon as its windows so far decide it
(decided_early): it fails, or passes on to its answers, and its figures so far stand for it.

The KL divergence of a point is predicted from its loss by a power law, scale x loss ** exponent: KL grew as
about the square root of the loss along the frontier, on the demo (from 0.265 at a loss of 1.13 to 0.308 at
1.44) and at the 7B shape (from 0.596 at 0.37 to 1.035 at 1.13), where a factor proportional to the loss
undershot every step up (a candidate predicted at 0.34 measured 0.55). Before any point is measured the law is
a prior, 0.3 x loss ** 0.5 (the demo's scale is 0.25, the 1B shape's 0.34; the 7B shape's, 0.97, is not), so
that the first probe lands near the gate rather than at a fixed size every model passes with room to spare (at
4.5 bpw, the demo's KL was half the gate's: two more candidates, each a KL run and its tensors quantized, to
get down to it). After it, the law's exponent is fitted in log-log on the points measured where their losses
are apart by at least a quarter (nearer, their noise decides the slope: the prior's exponent stays), held
within [0.25, 1.5], and its scale fitted through them (median); the next probe is the smallest point predicted
to stay within 85 % of the gate's KL divergence. Where that guess lands at the smallest point known to pass,
the probe is a step of 3 % of its bytes below it (a mix that shares most of its tensors' types, so cheap to
make); where it lands at the largest point known to fail, or the last miss was accuracy or perplexity (which
the loss does not predict), the probe halves the bracket's bytes instead. It stops when the smallest point
known to pass is within the margin (no room is predicted below it), when the bracket is within 1 % of the
file's bytes, or when the budget of candidates is spent.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from cpuforge.autoquant.frontier import Frontier
from cpuforge.evaluate.gate import Gate
from cpuforge.evaluate.perplexity import ppl_increase_pct

KL_MARGIN = 0.85
RESOLUTION = 0.01
EDGE_STEP = 0.03  # of the file's bytes: the step past the smallest passing point when the limit is predicted at it
CLEAR = 1.25  # a KL run is decided early when its figures so far are this factor past the gate's limits or within them
MIN_WINDOWS = 4
MIN_SPREAD = 1.25  # the ratio of losses, largest to smallest measured, from which the exponent is fitted
EXPONENTS = (0.25, 1.5)  # the fitted exponent is held within these


@dataclass(frozen=True)
class KlLaw:
    """A point's KL divergence predicted from its loss: scale x loss ** exponent."""

    scale: float
    exponent: float

    def max_loss(self, kl: float) -> float:
        """The largest loss predicted to keep the KL divergence within `kl`."""
        return (kl / self.scale) ** (1 / self.exponent)


PRIOR = KlLaw(scale=0.3, exponent=0.5)  # the first probe's prediction, before any point is measured


def decided_early(gate: Gate, figures: dict) -> str | None:
    """How a KL run's figures over the windows so far (at least MIN_WINDOWS, spread over the held-out text:
    cpuforge.evaluate.perplexity.spread_logits) decide it, so the rest of its run is not worth waiting for: "a
    clear miss", its KL divergence or its perplexity's increase more than CLEAR times the gate's limit, or "a
    clear pass", its KL divergence's bound and its perplexity's increase within the limits divided by CLEAR;
    None while neither. A candidate that passes this way is measured whole again by the report, as every quant
    of quant_types."""
    if figures["windows"] < MIN_WINDOWS:
        return None
    increase_pct = ppl_increase_pct(figures)
    if figures["kl_divergence"] > CLEAR * gate.max_kl_divergence or increase_pct > CLEAR * gate.max_ppl_increase_pct:
        return "a clear miss"
    if CLEAR * gate.kl_bound(figures) <= gate.max_kl_divergence and CLEAR * increase_pct <= gate.max_ppl_increase_pct:
        return "a clear pass"
    return None


def predicted(frontier: Frontier, law: KlLaw, gate: Gate) -> int:
    """The smallest point whose KL divergence, by `law`, is predicted within the margin of the gate's (-1 when
    none is: losses rise along the frontier)."""
    losses = [frontier.loss(k) for k in range(len(frontier))]
    return bisect.bisect_right(losses, law.max_loss(KL_MARGIN * gate.max_kl_divergence)) - 1


def first_probe(frontier: Frontier, gate: Gate) -> int:
    return max(0, predicted(frontier, PRIOR, gate))


def point_of_bytes(frontier: Frontier, target: float, lo: int, hi: int) -> int:
    """The point strictly between `lo` and `hi` whose bytes are nearest `target`."""
    points = range(lo + 1, hi)
    return min(points, key=lambda k: (abs(frontier.bytes(k) - target), k))


def kl_law(frontier: Frontier, results: dict[int, dict]) -> KlLaw:
    """The power law through the points measured: its exponent fitted in log-log (least squares) where their
    losses are far enough apart, else the prior's; its scale the median through them."""
    points = [(math.log(frontier.loss(k)), math.log(r["kl_divergence"])) for k, r in results.items()
              if frontier.loss(k) > 0 and r["kl_divergence"] > 0]  # fmt: skip
    if not points:
        return PRIOR
    xs, ys = zip(*points)
    exponent = PRIOR.exponent
    if max(xs) - min(xs) >= math.log(MIN_SPREAD):
        slope = statistics.linear_regression(xs, ys).slope
        exponent = min(max(slope, EXPONENTS[0]), EXPONENTS[1])
    return KlLaw(math.exp(statistics.median(y - exponent * x for x, y in points)), exponent)


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
    if not last["passed"] and last["kl_divergence"] <= gate.max_kl_divergence:
        return halve
    guess = predicted(frontier, kl_law(frontier, results), gate)
    if lo >= 0 and guess <= lo + 1:
        # the limit predicted at the smallest point that passed: a short step past it, whose mix shares most
        # of its tensors' types (cheap to make), rather than a jump to the middle of the bracket
        return point_of_bytes(frontier, top * (1 - EDGE_STEP), lo, hi)
    if guess <= lo or guess >= hi or guess == hi - 1:
        return halve
    return guess


def search(frontier: Frontier, measure: Callable[[int], dict], measure_task: Callable[[int, dict], dict],
           gate: Gate, first: int, budget: int, task: bool) -> dict[int, dict]:  # fmt: skip
    """Measure points (`measure(k)`: the figures against the f16 logits of point k) until the bracket closes or
    `budget` candidates are spent, then the task (`measure_task(k, figures so far)`: its accuracy) on the
    smallest that passed, going on above it while the accuracy misses; every result, by point, with
    `passed`, `misses` and `order` (its last measurement's place). Without a task (`task` false) the first
    part decides."""
    results: dict[int, dict] = {}
    steps = 0
    while True:
        k = next_probe(frontier, results, gate, first) if len(results) < budget else None
        if k is None:
            k = chosen(results)
            if k is None or not task or "accuracy" in results[k]:
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
