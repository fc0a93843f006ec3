"""(IA)³: a learned vector scales a layer's output rows, or, on feedforward modules, its input columns."""

from __future__ import annotations

import torch

from .base import FAN_IN_FAN_OUT_LINEAR, INIT, MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, SELECTION, Tuner

FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "target_modules": SELECTION,
    "exclude_modules": SELECTION,
    # the saved vector's shape says it too: (1, in) scales the input, (out, 1) the output
    "feedforward_modules": "exact",
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
    "modules_to_save": MODULES_TO_SAVE,
    "init_ia3_weights": INIT,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's IA3 Linear.merge: W * l, where l is (out, 1) for an output scaling and (1, in) for a feedforward one."""
    return weight * tensors["ia3_l"].float()


def merged_bias(
    bias: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict, weight: torch.Tensor
) -> torch.Tensor:
    """peft scales the bias with the output scaling; a feedforward module scales its input, so its bias stays."""
    ia3_l = tensors["ia3_l"].float()
    if ia3_l.shape[0] == 1 and ia3_l.shape[1] != 1:
        return bias
    return bias * ia3_l.reshape(bias.shape)


TUNER = Tuner("IA3", FIELDS, ("ia3_l",), merged_weight, merged_bias=merged_bias)
