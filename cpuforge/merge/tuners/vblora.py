"""VB-LoRA: LoRA's A and B assembled from sub-vectors of one shared vector bank, each a softmax mix of its top-k
bank vectors by trained logits (or, with save_only_topk_weights, by the saved top-k indices and weights)."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, INIT, Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="init_weights"),
    # r, num_vectors and vector_length are the saved tensors' shapes
    "r": "exact",
    "num_vectors": "exact",
    "vector_length": "exact",
    "topk": "exact",
    "save_only_topk_weights": "exact",
    "vblora_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
    "init_vector_bank_bound": INIT,
    "init_logits_std": INIT,
}
SHARED = ("vblora_vector_bank",)  # saved once, as base_model.vblora_vector_bank
SUFFIXES = tuple(
    f"vblora_logits_{m}{kind}" for m in "AB" for kind in ("", "_topk_indices", "_topk_weights")
)  # fmt: skip


def logits(tensors: dict, name: str, num_vectors: int) -> torch.Tensor:
    """The logits as saved, or rebuilt from top-k as peft's VBLoRAModel._remap_adapter_state_dict_for_load does:
    the last weight is 1 minus the others, the logits their logs, every other entry -inf."""
    if name in tensors:
        return tensors[name].float()
    indices = tensors[name + "_topk_indices"].to(torch.long)
    weights = tensors[name + "_topk_weights"].float()
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    top = torch.log(weights)
    return torch.zeros([*top.shape[:-1], num_vectors]).fill_(float("-inf")).scatter(-1, indices, top)


def mix(logit: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """peft's VBLoRALayer._get_low_rank_matrix: softmax over the top-k logits, mixing those bank vectors."""
    top, indices = logit.topk(topk, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's VBLoRA Linear.get_delta_weight: B @ A, A (r × in) and B (out × r) tiled from the mixed vectors."""
    bank = shared["vblora_vector_bank"].float()
    topk = config.get("topk", 2)
    logits_a = logits(tensors, "vblora_logits_A", bank.shape[0])
    logits_b = logits(tensors, "vblora_logits_B", bank.shape[0])
    a = mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return weight + b @ a


TUNER = Tuner("VBLORA", FIELDS, SUFFIXES, merged_weight, shared=SHARED, optional=SUFFIXES)
