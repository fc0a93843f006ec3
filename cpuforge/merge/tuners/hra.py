"""HRA: the weight's input side is multiplied by a chain of r Householder reflections (or one reflection of their
Gram-Schmidt basis, apply_GS); merged as W @ H."""

from __future__ import annotations

import torch

from .base import Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    "r": "exact",  # each module's count of reflections is its hra_u's column count
    "apply_GS": "exact",
}


def reflections(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """peft's HRALayer.get_delta_weight: I - 2 U U^T over U's Gram-Schmidt basis, or Π (I - 2 u_i u_i^T) in order."""
    n, rank = u.shape
    if gram_schmidt:
        basis = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (basis[j].t() @ ui) * basis[j]
            basis.append((ui / ui.norm()).view(-1, 1))
        basis = torch.cat(basis, dim=1)
        return torch.eye(n) - 2 * basis @ basis.t()
    u = u / u.norm(dim=0)
    h = torch.eye(n)
    for i in range(rank):
        ui = u[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's HRA Linear.merge: W @ H."""
    return torch.mm(weight, reflections(tensors["hra_u"].float(), config.get("apply_GS", False)))


TUNER = Tuner("HRA", FIELDS, ("hra_u",), merged_weight)
