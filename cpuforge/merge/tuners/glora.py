"""GLoRA: a generalised prompt/weight/bias update, W + W ⊙ A + B and b + b ⊙ D + E + W @ C, each of A…E a LoRA
product, a vector, a scalar or nothing (config_A_B, config_C, config_D_E). peft changes the bias only where the base
layer has one."""

from __future__ import annotations

import torch

from .base import Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="exclude_modules layers_to_transform layers_pattern"),
    # the kind of each path is seen in its saved tensors (Xd/Xu, X or zeros) and r in their shapes
    "r": "exact",
    "config_A_B": "exact",
    "config_C": "exact",
    "config_D_E": "exact",
}
SUFFIXES = tuple(f"glora_{p}.{t}" for p in "ABCDE" for t in ("Xd", "Xu", "X", "zeros"))


def path(tensors: dict, name: str):
    """peft's GloraPath.forward for the path's saved tensors: Xd @ Xu (LoRA), X (vector; a 1-element X is the
    scalar X[0]), its zeros buffer (empty path), or 0.0 when nothing is saved."""
    t = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.startswith(f"glora_{name}.")}
    if "Xd" in t:
        return t["Xd"] @ t["Xu"]
    if "X" in t:
        return t["X"][0] if t["X"].shape == (1,) else t["X"]
    return t.get("zeros", 0.0)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's GloraLayer.merge: W + W ⊙ A + B."""
    return weight + (weight * path(tensors, "A") + path(tensors, "B"))


def merged_bias(
    bias: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict, weight: torch.Tensor
) -> torch.Tensor:
    """peft's GloraLayer.merge for the bias: b + b ⊙ D + E + (W @ C), W the weight before the merge."""
    return bias + (
        bias * path(tensors, "D") + path(tensors, "E") + torch.matmul(weight, path(tensors, "C")).squeeze(-1)
    )


TUNER = Tuner("GLORA", FIELDS, SUFFIXES, merged_weight, optional=SUFFIXES,
              merged_bias=merged_bias)  # fmt: skip
