"""DeLoRA: a LoRA whose rank-one terms are normalised and bounded by a trained lambda, scaled per input column by
the base weight's column norms (saved with the adapter as delora_w_norm)."""

from __future__ import annotations

import torch

from .base import DROPOUT, INIT, Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    "r": "exact",
    "rank_pattern": "exact",  # each module's rank is its tensors' rank
    # the starting lambda; the trained one is the tensor delora_lambda
    "delora_lambda": INIT,
    "lambda_pattern": INIT,
    "module_dropout": DROPOUT,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's DeloraLayer._compute_delta: B @ diag(lambda / r / (|A_i| |B^i|)) @ A, times w_norm per column."""
    a, b = tensors["delora_A"].float(), tensors["delora_B"].float()
    lam, w_norm = tensors["delora_lambda"].float(), tensors["delora_w_norm"].float()
    a_norm = torch.clamp(a.norm(dim=1), min=1e-4)
    b_norm = torch.clamp(b.norm(dim=0), min=1e-4)
    delta = b @ torch.diag_embed(lam / a.shape[0] / (a_norm * b_norm)) @ a
    return weight + delta * w_norm.unsqueeze(0)


TUNER = Tuner(
    "DELORA",
    FIELDS,
    ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    merged_weight,
)
