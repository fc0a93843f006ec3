"""The mixes that lose least for their size: every tensor's types, traded against each other.

The model's loss is taken as the sum of its tensors' relative output noises (sensitivity.py); a mix's
size as the sum of its tensors' bytes. Minimising loss + lambda * bytes separates by tensor, so the best
mixes for every lambda are found exactly by a greedy sweep: start with each tensor in its best type, and
step down, one tensor at a time, along the step that costs least loss per byte saved, each tensor moving
only along the lower convex hull of its own (bytes, error) points (a type off that hull is never the best
for any lambda). Each step is one point of the frontier, from the largest mix to the smallest.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from cpuforge.autoquant.sensitivity import Option


@dataclass(frozen=True)
class Step:
    """Tensor `tensor` moves to `option`; after it the mix has `bytes` bytes and a loss of `loss`."""

    tensor: str
    option: Option
    bytes: int
    loss: float


@dataclass(frozen=True)
class Frontier:
    start: dict[str, Option]  # each tensor in its largest, least lossy type
    steps: list[Step]

    def __len__(self) -> int:
        return len(self.steps) + 1

    def mix(self, k: int) -> dict[str, Option]:
        """Point k: the start with the first k steps taken (0 the largest mix, len - 1 the smallest)."""
        types = dict(self.start)
        for s in self.steps[:k]:
            types[s.tensor] = s.option
        return types

    def bytes(self, k: int) -> int:
        return self.steps[k - 1].bytes if k else sum(o.bytes for o in self.start.values())

    def loss(self, k: int) -> float:
        return self.steps[k - 1].loss if k else sum(o.error for o in self.start.values())

    def tail(self, k: int) -> Frontier:
        """The frontier from point k on (its point 0 is this one's k)."""
        return Frontier(self.mix(k), self.steps[k:])

    def largest_within(self, limit: int) -> int | None:
        """The first point (the least lossy) of at most `limit` bytes, or None when even the smallest is larger."""
        return next((k for k in range(len(self)) if self.bytes(k) <= limit), None)


def hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of one tensor's options, from the most bytes to the fewest: each next option
    saves bytes at a loss per byte that never falls."""
    # a type that is both larger and lossier than another is never chosen; ties keep the first listed
    by_size = sorted(options, key=lambda o: (-o.bytes, o.error))
    kept: list[Option] = []
    for o in by_size:
        if kept and o.bytes == kept[-1].bytes:
            continue
        while kept and o.error <= kept[-1].error:  # as good for fewer bytes: the larger one is never best
            kept.pop()
        while len(kept) >= 2 and _slope(kept[-2], kept[-1]) >= _slope(kept[-1], o):
            kept.pop()
        kept.append(o)
    return kept


def _slope(a: Option, b: Option) -> float:
    """Loss added per byte saved going from `a` to the smaller `b`."""
    return (b.error - a.error) / (a.bytes - b.bytes)


def sweep(table: dict[str, list[Option]]) -> Frontier:
    """The frontier of the mixes of `table` (tensor -> its options); steps of equal cost taken in the
    order of the tensors' names, so the same table always gives the same frontier."""
    hulls = {name: hull(options) for name, options in sorted(table.items())}
    start = {name: h[0] for name, h in hulls.items()}
    total_bytes, total_loss = sum(o.bytes for o in start.values()), sum(o.error for o in start.values())
    queue = [(_slope(h[0], h[1]), name, 1) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(queue)
    steps = []
    while queue:
        _, name, i = heapq.heappop(queue)
        before, after = hulls[name][i - 1], hulls[name][i]
        total_bytes += after.bytes - before.bytes
        total_loss += after.error - before.error
        steps.append(Step(name, after, total_bytes, total_loss))
        if i + 1 < len(hulls[name]):
            heapq.heappush(queue, (_slope(after, hulls[name][i + 1]), name, i + 1))
    return Frontier(start, steps)
