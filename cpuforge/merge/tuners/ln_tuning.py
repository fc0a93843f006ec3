"""LN tuning: trained copies of normalisation layers; peft's merge swaps the copy in for the base layer.

Its modules are norms (LLaMA's RMSNorm: a 1-D weight), not nn.Linear layers."""

from __future__ import annotations

import torch

from .base import MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, SELECTION, Tuner

FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "target_modules": SELECTION,
    "exclude_modules": SELECTION,
    "modules_to_save": MODULES_TO_SAVE,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's LNTuningLayer.merge: the trained copy replaces the layer, so its weight is the merged weight."""
    return tensors["ln_tuning_layers.weight"].float().reshape(weight.shape)


def merged_bias(
    bias: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict, weight: torch.Tensor
) -> torch.Tensor:
    """A LayerNorm's trained copy brings its bias too (LLaMA's RMSNorm has none)."""
    return tensors["ln_tuning_layers.bias"].float() if "ln_tuning_layers.bias" in tensors else bias


TUNER = Tuner(
    "LN_TUNING",
    FIELDS,
    ("ln_tuning_layers.weight", "ln_tuning_layers.bias"),
    merged_weight,
    merged_bias=merged_bias,
    optional=("ln_tuning_layers.bias",),
)
