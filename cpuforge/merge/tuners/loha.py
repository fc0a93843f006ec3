"""LoHa: the delta is the Hadamard product of two low-rank products, (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r."""

from __future__ import annotations

import torch

from . import lycoris
from .base import Tuner

FIELDS = dict(lycoris.FIELDS)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's LycorisLayer.merge with LoHa's get_delta_weight (Linear: no CP tensors hada_t1/hada_t2)."""
    t = {k: v.float() for k, v in tensors.items()}
    if "hada_t1" in t or "hada_t2" in t:
        raise ValueError(f"{module}: LoHa's CP tensors hada_t1/hada_t2 belong to convolutions, not nn.Linear")
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * lycoris.scaling(config, module)
    return weight + delta.reshape(weight.shape)


TUNER = Tuner(
    "LOHA",
    FIELDS,
    ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    merged_weight,
    optional=("hada_t1", "hada_t2"),
)
