"""PEANuT: the delta is a small non-linear network applied to the base weight itself (W^T through A, residual
encoder/decoder pairs, B), times scaling."""

from __future__ import annotations

import torch

from .base import REFUSE, Tuner, usual_fields

MAX_DEPTH = 64  # the tensor names are listed per depth; deeper networks are refused rather than half-read
FIELDS = {
    **usual_fields(lacks="bias"),
    "r": "exact",  # the saved tensors' shape
    "depth": REFUSE,
    "act_fn": "exact",
    "scaling": "exact",
}
LAYERS = tuple(f"peanut_{part}.{i}.weight" for part in ("encoders", "decoders") for i in range(MAX_DEPTH))
SUFFIXES = ("peanut_A.weight", "peanut_B.weight", *LAYERS)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's PeanutLayer._compute_delta_weight on the weight before the merge, added to it."""
    from transformers.activations import ACT2FN  # transformers' table, as peft uses it

    act = ACT2FN[config.get("act_fn", "relu")]
    t = {k: v.float() for k, v in tensors.items()}
    depth = config.get("depth", 0)
    delta = act(torch.matmul(weight.transpose(0, 1), t["peanut_A.weight"].t()))
    residuals = []
    for i in range(depth):
        residuals.append(delta)
        delta = act(torch.nn.functional.linear(delta, t[f"peanut_encoders.{i}.weight"]))
    for i in range(depth):
        delta = act(torch.nn.functional.linear(delta, t[f"peanut_decoders.{i}.weight"]))
        delta = delta + residuals[depth - 1 - i]
    delta = torch.nn.functional.linear(delta, t["peanut_B.weight"])
    return weight + (delta * config.get("scaling", 1.0)).transpose(0, 1)


TUNER = Tuner(
    "PEANUT", FIELDS, SUFFIXES, merged_weight, accepted={"depth": tuple(range(MAX_DEPTH + 1))}, optional=LAYERS
)
