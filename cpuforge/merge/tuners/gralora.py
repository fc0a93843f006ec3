"""GraLoRA: k × k sub-block LoRAs with information exchange, plus an optional plain LoRA of rank hybrid_r; scaled
by alpha / (r + hybrid_r)."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="exclude_modules"),
    # r, gralora_k and hybrid_r are the saved tensors' shapes
    "r": "exact",
    "hybrid_r": "exact",
    "gralora_k": "exact",
    "alpha": "exact",
    "gralora_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}
SUFFIXES = ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight")


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's GraLoRA Linear.get_delta_weight: A [k, in/k, r] scattered per input sub-block, its rank split in k
    parts that meet B [k, r, out/k] crosswise; plus B_general @ A_general; all times alpha / (r + hybrid_r)."""
    out_features, in_features = weight.shape
    a, b = tensors["gralora_A"].float(), tensors["gralora_B"].float()
    k, _, r = a.shape
    sub_rank = r // k
    l_indices = torch.arange(in_features)
    n_indices = l_indices // (in_features // k)
    i_indices = l_indices % (in_features // k)
    scattered = torch.zeros(in_features, k, r)
    scattered.scatter_(1, n_indices.unsqueeze(1).unsqueeze(2).expand(-1, 1, r), a[n_indices, i_indices, :].unsqueeze(1))
    crossed = scattered.view(in_features, k, k, sub_rank).permute(0, 2, 1, 3).reshape(in_features, k, r)
    delta = torch.einsum("ikr, kro -> iko", crossed, b).reshape(in_features, out_features).T
    hybrid_r = 0
    if "gralora_A_general.weight" in tensors:
        a_general = tensors["gralora_A_general.weight"].float()
        hybrid_r = a_general.shape[0]
        delta = delta + tensors["gralora_B_general.weight"].float() @ a_general
    return weight + delta * (config.get("alpha", 64) / (r + hybrid_r))


TUNER = Tuner(
    "GRALORA",
    FIELDS,
    SUFFIXES,
    merged_weight,
    optional=("gralora_A_general.weight", "gralora_B_general.weight"),
)
