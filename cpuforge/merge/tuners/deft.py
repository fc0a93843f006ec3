"""DEFT: removes a learned subspace from the weight's outputs and injects a trained one: W + Q_P (R·s - right^T W),
or, with para (PaRa), only the removal W - Q_P right^T W. The projection is P itself (relu) or P's QR (qr)."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, INIT, Tuner, usual_fields

FIELDS = {
    **usual_fields(),
    "r": "exact",  # the saved tensors' shape
    "decomposition_method": "exact",
    "alpha": "exact",
    "para": "exact",
    "init_scale": INIT,
    "deft_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's DeftLayer.merge (_merge_factor and _delta_from_factor), in f32 as peft computes it."""
    p = tensors["deft_P"].float()
    method = config.get("decomposition_method", "relu")
    if method == "relu":
        q, right = p, torch.relu(p)
    elif method == "qr":
        q, _ = torch.linalg.qr(p)
        right = q
    else:
        raise ValueError(f"{module}: DEFT decomposition_method {method!r} is neither relu nor qr")
    factor = right.transpose(0, 1) @ weight
    if config.get("para", False):
        return weight + -(q @ factor)
    alpha = config.get("alpha")
    scaling = (alpha / p.shape[1]) if alpha else 1.0
    return weight + q @ (tensors["deft_R"].float() * scaling - factor)


TUNER = Tuner("DEFT", FIELDS, ("deft_P", "deft_R"), merged_weight, optional=("deft_R",))
