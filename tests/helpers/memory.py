"""The memory torch itself allocates for an operation, counted from the tensors it makes: what the sizing's working
sets are checked against, independently of their formulas."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """While active, the bytes of the storages torch's operators create, and the most of them alive at once
    (`peak`). Each operator's outputs are seen as they are made, composite ones (einsum, block_diag) as the
    operators they run; a storage is counted once, however many views of it there are, and leaves the count
    when its last view is freed. Storages made before, and what a library allocates beneath torch (LAPACK's
    workspace), are not counted."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors on it]
        self.live = self.peak = 0

    def freed(self, ptr: int) -> None:
        entry = self.storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.storages:
                if ptr in inputs:
                    continue  # a view of (or in place on) a tensor made before
                self.storages[ptr] = [t.untyped_storage().nbytes(), 0]
                self.live += self.storages[ptr][0]
                self.peak = max(self.peak, self.live)
            self.storages[ptr][1] += 1
            weakref.finalize(t, self.freed, ptr)
        return out


def peak_bytes(operation) -> int:
    """The most bytes torch holds at once while `operation()` runs, its result included until it is dropped."""
    with LiveBytes() as counter:
        result = operation()
        del result
    return counter.peak
