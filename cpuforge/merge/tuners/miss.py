"""MiSS (formerly Bone): a trained block shared across the weight's column blocks. By init_weights: the default adds
it to every r-column block; "mini" repeats a narrower block first; "bat" updates each r × r block as W_b @ M + M."""

from __future__ import annotations

import torch

from .base import DROPOUT, Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="init_weights"),
    "r": "exact",  # the block's shape
    "mini_r": "exact",
    # not only the start: peft's merge follows it (MissLinear.miss_fn = init_weights)
    "init_weights": "exact",
    "miss_dropout": DROPOUT,
}


def bat(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """peft's MissLayer.get_delta_weight: each r × r block W_b of W becomes W_b @ M + M (returned as the delta)."""
    r = block.size(-1)
    w = weight.reshape(weight.size(0) // r, r, weight.size(1) // r, r).permute(2, 0, 1, 3)
    return (w @ block + block).permute(1, 2, 0, 3).reshape(*weight.shape)


def blockwise(weight: torch.Tensor, block: torch.Tensor, mini: bool) -> torch.Tensor:
    """peft's MissLayer.get_delta_weight_miss (the merged weight itself): the block added to every r-column block,
    and its first columns to the remainder where r does not divide in_features."""
    weight = weight.clone()  # peft writes into the weight it is given
    out_features, in_features = weight.shape
    r = block.size(0)
    if mini:
        block = block.repeat(1, out_features // block.size(1))
    if in_features % r != 0:
        n_blocks = in_features // r
        aligned = n_blocks * r
        w = weight[:, :aligned].reshape(-1, n_blocks, r).permute(1, 2, 0)
        weight[:, :aligned] = (w + block).permute(2, 0, 1).reshape(*weight[:, :aligned].shape)
        weight[:, aligned:] = weight[:, aligned:] + block.transpose(0, 1)[:, : in_features % r]
        return weight
    w = weight.reshape(-1, in_features // r, r).permute(1, 2, 0)
    return (w + block).permute(2, 0, 1).reshape(*weight.shape)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's MissLinear.merge, by the mode init_weights names."""
    block = tensors["miss_block"].float()
    mode = config.get("init_weights", True)
    if mode == "bat":
        return weight + bat(weight, block)
    return blockwise(weight, block, mode == "mini")


TUNER = Tuner("MISS", FIELDS, ("miss_block",), merged_weight)
