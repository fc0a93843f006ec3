"""RandLoRA: full-rank updates from shared random bases (saved once), scaled per module by trained lambda and gamma."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, REFUSE, Tuner, usual_fields

DRAWN = "ignored: they chose the shared random bases, which the adapter file holds (save_projection is required)"
FIELDS = {
    **usual_fields(lacks="exclude_modules"),
    "r": "exact",
    "randlora_alpha": "exact",
    "projection_prng_key": DRAWN,
    "sparse": DRAWN,
    "very_sparse": DRAWN,
    # without the bases in the file they would have to be drawn again, and peft draws the dense ones in bf16 or
    # f16 depending on the machine (peft's randlora _kaiming_init), so the same seed need not give the same bases
    "save_projection": REFUSE,
    "randlora_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}
SHARED = ("randlora_A", "randlora_B")  # saved once as base_model.randlora_A / _B (some peft versions also per module)


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's RandLoRA Linear.get_delta_weight with get_scaled_bases: the bases sliced to this module's dimensions
    and count, the smaller one scaled by lambda and gamma, their product times randlora_alpha / r."""
    out_features, in_features = weight.shape
    lam, gamma = tensors["randlora_lambda"].float(), tensors["randlora_gamma"].float()
    r, num_bases = lam.shape
    min_dim, max_dim = min(out_features, in_features), max(out_features, in_features)
    bases_a = shared.get("randlora_A", tensors.get("randlora_A")).float()[:, :num_bases, :min_dim]
    bases_b = shared.get("randlora_B", tensors.get("randlora_B")).float()[:max_dim, :num_bases, :]
    scaled_b = bases_b.flatten(start_dim=1)
    scaled_a = (lam[:, :, None] * bases_a * gamma[None,]).flatten(end_dim=1)
    # peft names the pair the other way round on return; kept in its order, so the product is its product
    if min_dim == in_features:
        first, second = scaled_a, scaled_b
    else:
        first, second = scaled_b.T, scaled_a.T
    update = (first.T @ second.T).T
    return weight + update * (config.get("randlora_alpha", 640) / r)


TUNER = Tuner(
    "RANDLORA",
    FIELDS,
    ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
    merged_weight,
    accepted={"save_projection": (True,)},
    shared=SHARED,
    optional=("randlora_A", "randlora_B"),
)
