"""Which candidate to ship: the objective over every candidate measured, and which candidates another beats.

A candidate is a record with its size (`size_bytes`), its generation speed measured side by side with the
others (`tg_tps`) and, once verified, whether it passes the gate (`passed`). A passing candidate dominates
another when it is no larger and no slower, and smaller or faster. The objective chooses among the passing
candidates that no other passing candidate dominates (the front), where two speeds within the bench's
tolerance (a fraction of the faster) are a tie:

- `speed` (the default): of the front's candidates tied with its fastest, the smallest; then the faster; then
  the lower KL divergence;
- `size`: the front's smallest; then the faster; then the lower KL divergence.

So the chosen file is never dominated by a candidate measured, and for `speed` it is within the tolerance of
the fastest candidate that passes.
"""

from __future__ import annotations

OBJECTIVES = ("speed", "size")


def faster(a: dict, b: dict, tolerance: float) -> bool:
    """Whether `a` generates faster than `b` beyond the tolerance (a fraction of the faster's speed)."""
    return a["tg_tps"] - b["tg_tps"] > tolerance * max(a["tg_tps"], b["tg_tps"])


def dominates(b: dict, a: dict) -> bool:
    """Whether the passing candidate `b` beats `a`: no larger and no slower, and smaller or faster."""
    if b is a or not b.get("passed") or b["size_bytes"] > a["size_bytes"] or b["tg_tps"] < a["tg_tps"]:
        return False
    return b["size_bytes"] < a["size_bytes"] or b["tg_tps"] > a["tg_tps"]


def choose(candidates: list[dict], objective: str, tolerance: float) -> dict | None:
    """The candidate to ship (None when none passes)."""
    passing = [c for c in candidates if c.get("passed")]
    front = [c for c in passing if not any(dominates(b, c) for b in passing)]
    if not front:
        return None
    if objective == "speed":
        fastest = max(front, key=lambda c: c["tg_tps"])
        front = [c for c in front if not faster(fastest, c, tolerance)]
    return min(front, key=lambda c: (c["size_bytes"], -c["tg_tps"], c["kl_divergence"]))


def order(candidates: list[dict], objective: str) -> list[dict]:
    """The order to verify candidates in: the objective's best first, so the rest can be pruned."""
    if objective == "size":
        return sorted(candidates, key=lambda c: (c["size_bytes"], -c["tg_tps"]))
    return sorted(candidates, key=lambda c: (-c["tg_tps"], c["size_bytes"]))


def beaten_by(candidate: dict, verified: list[dict], objective: str, tolerance: float) -> dict | None:
    """A passing candidate that `candidate` cannot be chosen over, whatever it measures: one that dominates it
    or, for speed, one faster beyond the tolerance; for size, one smaller. Such a candidate need not be
    verified."""
    for p in verified:
        if not p.get("passed") or p is candidate:
            continue
        if dominates(p, candidate):
            return p
        if objective == "speed" and faster(p, candidate, tolerance):
            return p
        if objective == "size" and p["size_bytes"] < candidate["size_bytes"]:
            return p
    return None


def mark_dominated(candidates: list[dict]) -> None:
    """Each candidate's `dominated_by`: the name of a passing candidate that dominates it, else None."""
    for c in candidates:
        if c.get("tg_tps") is None:  # not benched: a mix that failed
            c["dominated_by"] = None
            continue
        by = next((b for b in candidates if dominates(b, c)), None)
        c["dominated_by"] = by["name"] if by else None
