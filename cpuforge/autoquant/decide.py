"""Which candidate to ship: the objective over every candidate measured, and which candidates another beats.

A candidate is a record with its size (`tensor_bytes`, its matrices' bytes: the rest of every candidate's file
is the f16 GGUF's norms and metadata, the same but for a few KB of keys, which a file planned and not yet
made does not have yet), its generation speed measured side by side with the
others (`tg_tps`) and, once verified, whether it passes the gate (`passed`). A passing candidate dominates
another when it is no larger and no slower, and smaller or faster. The objective chooses among the passing
candidates that no other passing candidate dominates (the front), where two speeds within the bench's
tolerance (a fraction of the faster), or within the run's noise, are a tie:

- `speed` (the default): of the front's candidates tied with its fastest, the smallest; then the faster; then
  the lower KL divergence;
- `size`: the front's smallest; then the faster; then the lower KL divergence.

So the chosen file is never dominated by a candidate measured, and for `speed` it is within the tolerance of
the fastest candidate that passes.

Speeds compare only within one llama-bench run: the screen's (`screen_tg_tps`, every candidate but the mixes, on
their screen files), by which the search orders and prunes, or the final one (`tg_tps`, the passing files whole),
by which it chooses; two candidates are judged by the last run both took part in.
"""

from __future__ import annotations

import math

OBJECTIVES = ("speed", "size")
FINAL, SCREEN = "tg_tps", "screen_tg_tps"
SIZE = "tensor_bytes"


def faster(a: dict, b: dict, tolerance: float, speed: str = FINAL) -> bool:
    """Whether `a` generates faster than `b` beyond the tolerance (a fraction of the faster's speed) and beyond
    the noise of the run (their standard deviations over the repetitions, combined)."""
    noise = math.hypot(a.get(f"{speed}_std") or 0.0, b.get(f"{speed}_std") or 0.0)
    return a[speed] - b[speed] > max(tolerance * max(a[speed], b[speed]), noise)


def dominates(b: dict, a: dict, speed: str = FINAL) -> bool:
    """Whether the passing candidate `b` beats `a`: no larger and no slower, and smaller or faster."""
    if b is a or not b.get("passed") or b[SIZE] > a[SIZE] or b[speed] < a[speed]:
        return False
    return b[SIZE] < a[SIZE] or b[speed] > a[speed]


def choose(candidates: list[dict], objective: str, tolerance: float, speed: str = FINAL) -> dict | None:
    """The candidate to ship (None when none passes)."""
    passing = [c for c in candidates if c.get("passed")]
    front = [c for c in passing if not any(dominates(b, c, speed) for b in passing)]
    if not front:
        return None
    if objective == "speed":
        fastest = max(front, key=lambda c: c[speed])
        front = [c for c in front if not faster(fastest, c, tolerance, speed)]
    return min(front, key=lambda c: (c[SIZE], -c[speed], c["kl_divergence"]))


def order(candidates: list[dict], objective: str, speed: str = FINAL) -> list[dict]:
    """The order to verify candidates in: the objective's best first, so the rest can be pruned."""
    if objective == "size":
        return sorted(candidates, key=lambda c: (c[SIZE], -c[speed]))
    return sorted(candidates, key=lambda c: (-c[speed], c[SIZE]))


def beaten_by(candidate: dict, verified: list[dict], objective: str, tolerance: float,
              speed: str = FINAL) -> dict | None:  # fmt: skip
    """A passing candidate that `candidate` cannot be chosen over, whatever it measures: one that dominates it
    or, for speed, one faster beyond the tolerance; for size, one smaller. Such a candidate need not be
    verified."""
    for p in verified:
        if not p.get("passed") or p is candidate:
            continue
        if dominates(p, candidate, speed):
            return p
        if objective == "speed" and faster(p, candidate, tolerance, speed):
            return p
        if objective == "size" and p[SIZE] < candidate[SIZE]:
            return p
    return None


def shared_run(a: dict, b: dict) -> str | None:
    """The speed key of the last llama-bench run both `a` and `b` took part in (None: no run holds both)."""
    return next((k for k in (FINAL, SCREEN) if a.get(k) is not None and b.get(k) is not None), None)


def mark_dominated(candidates: list[dict]) -> None:
    """Each candidate's `dominated_by`: the name of a passing candidate that dominates it in a run both took
    part in, else None (a failing mix is in no run)."""
    for c in candidates:
        by = next((b for b in candidates if (run := shared_run(b, c)) and dominates(b, c, run)), None)
        c["dominated_by"] = by["name"] if by else None
