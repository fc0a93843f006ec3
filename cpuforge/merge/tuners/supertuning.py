"""SuperTuning: trained values added at saved flat positions of the weight, plus (Supra mode, r set) a LoRA."""

from __future__ import annotations

import torch

from .base import DROPOUT, INIT, MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, REFUSE, SELECTION, Tuner

CHOICE = "ignored: chose the sparse positions, which the adapter file holds (supertuning_indices)"
FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "sparsity": CHOICE,
    "select_top": CHOICE,
    # without saved positions peft recomputes them from the base weight at load; not implemented here
    "save_precomputed_indices": REFUSE,
    "r": "exact",
    "lora_alpha": "exact",
    "lora_dropout": DROPOUT,
    "init_weights": INIT,
    "modules_to_save": MODULES_TO_SAVE,
    "target_modules": SELECTION,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's SupertuningLayer.merge: the values scatter-added at the flat indices, then (alpha / r) * (B @ A)."""
    indices = tensors["supertuning_indices"].to(torch.int64)
    merged = weight.reshape(-1).scatter_add(0, indices, tensors["supertuning_values"].float()).reshape_as(weight)
    if "supertuning_lora_A.weight" in tensors:
        a, b = tensors["supertuning_lora_A.weight"].float(), tensors["supertuning_lora_B.weight"].float()
        merged = merged + (float(config["lora_alpha"]) / a.shape[0]) * (b @ a)
    return merged


TUNER = Tuner(
    "SUPERTUNING",
    FIELDS,
    ("supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight"),
    merged_weight,
    accepted={"save_precomputed_indices": (True,)},
    optional=("supertuning_lora_A.weight", "supertuning_lora_B.weight"),
)
