"""BEFT: a trained vector added to a layer's bias; the weight stays. peft refuses the merge where the base layer
has no bias, and so must the merge (Tuner.needs_bias)."""

from __future__ import annotations

import torch

from .base import INIT, MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, SELECTION, Tuner

FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "target_modules": SELECTION,
    "modules_to_save": MODULES_TO_SAVE,
    "init_weights": INIT,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """BEFT leaves the weight as it is."""
    return weight


def merged_bias(
    bias: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict, weight: torch.Tensor
) -> torch.Tensor:
    """peft's BEFT Linear.merge: bias + beft_bias (stored 1 × out)."""
    return bias + tensors["beft_bias"].float().squeeze()


TUNER = Tuner("BEFT", FIELDS, ("beft_bias",), merged_weight, merged_bias=merged_bias, needs_bias=True)
