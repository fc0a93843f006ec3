"""RoAd: 2-D rotations with scaling of the layer's output, in groups (like RoPE); merged as R @ W and R @ bias.

R is out × out: for a 7B MLP's 11008 outputs that is 0.5 GB in f32 beside the weight (peft builds it whole too)."""

from __future__ import annotations

import torch

from .base import INIT, MODULES_TO_SAVE, PEFT_CONFIG_FIELDS, SELECTION, Tuner

FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "variant": "exact",
    "group_size": "exact",
    "init_weights": INIT,
    "target_modules": SELECTION,
    "modules_to_save": MODULES_TO_SAVE,
}


def columns(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor):
    """peft's road _prepare_cols: the cos and sin columns, scaled, for road_1, road_2 or road_4."""
    if variant == "road_1":  # group_size // 2 parameters per group, each used twice
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), (
            alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()
        )
    raise ValueError(f"RoAd variant {variant!r} is none of road_1, road_2, road_4")


def rotation(config: dict, tensors: dict) -> torch.Tensor:
    """peft's road _get_delta_weight: first column on the diagonal, the second swapped by half groups, negated."""
    group_size = config.get("group_size", 64)
    first, second = columns(
        config.get("variant", "road_1"), group_size, tensors["road_theta"].float(), tensors["road_alpha"].float()
    )
    r = torch.diag(first)
    size = second.shape[0]
    swapped = second.reshape(-1, 2, group_size // 2)[:, [1, 0], :].flatten()
    rotated = torch.diag(swapped).reshape(-1, 2, group_size // 2, size)[:, [1, 0], :, :]
    rotated[:, 0, :, :] *= -1
    return r + rotated.reshape(size, size)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's RoAd Linear.merge: R @ W."""
    return torch.matmul(rotation(config, tensors), weight)


def merged_bias(
    bias: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict, weight: torch.Tensor
) -> torch.Tensor:
    """peft rotates the bias with the output: R @ b."""
    return torch.matmul(rotation(config, tensors), bias)


TUNER = Tuner("ROAD", FIELDS, ("road_theta", "road_alpha"), merged_weight, merged_bias=merged_bias)
