"""SHiRA: a sparse update, trained values at saved (row, column) positions, added to the weight."""

from __future__ import annotations

import torch

from .base import FAN_IN_FAN_OUT_LINEAR, INIT, MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, SELECTION, Tuner

MASK = "ignored: chooses the sparse positions, which the adapter file holds (shira_indices)"
FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "r": "exact",  # only the count of positions, which the saved tensors have
    "mask_type": MASK,
    "random_seed": MASK,
    "target_modules": SELECTION,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
    "init_weights": INIT,
    "modules_to_save": MODULES_TO_SAVE,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's ShiraLayer.get_delta_weight: a sparse COO tensor of the values at the indices, times scaling (1.0 as
    saved: peft's set_scale changes it at run time only); duplicate indices add up, as COO's do."""
    indices = tensors["shira_indices"].long()
    delta = torch.sparse_coo_tensor(indices, tensors["shira_weight"].float(), weight.shape)
    return weight + delta.to_dense()


TUNER = Tuner("SHIRA", FIELDS, ("shira_weight", "shira_indices"), merged_weight)
