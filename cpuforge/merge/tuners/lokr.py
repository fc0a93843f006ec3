"""LoKr: the delta is the Kronecker product of two factors, each whole or a low-rank product, times alpha / r."""

from __future__ import annotations

import torch

from . import lycoris
from .base import DROPOUT, Tuner

FIELDS = {
    **lycoris.FIELDS,
    # both only choose the factors' shapes, which the saved tensors have
    "decompose_both": "exact",
    "decompose_factor": "exact",
    "rank_dropout_scale": DROPOUT,
}


def factor(t: dict, whole: str, a: str, b: str) -> torch.Tensor:
    """One Kronecker factor: stored whole, or as the product of its two low-rank halves (peft keeps one of them)."""
    return t[whole] if whole in t else t[a] @ t[b]


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's LycorisLayer.merge with LoKr's get_delta_weight: kron(w1, w2) * alpha / r, reshaped to the weight."""
    t = {k: v.float() for k, v in tensors.items()}
    if "lokr_t2" in t:
        raise ValueError(f"{module}: LoKr's CP tensor lokr_t2 belongs to convolutions, not nn.Linear")
    w1 = factor(t, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
    w2 = factor(t, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    delta = torch.kron(w1, w2.contiguous()) * lycoris.scaling(config, module)
    return weight + delta.reshape(weight.shape)


SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
TUNER = Tuner("LOKR", FIELDS, SUFFIXES, merged_weight, optional=SUFFIXES)
