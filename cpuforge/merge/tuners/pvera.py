"""PVeRA: VeRA with a probabilistic down-projection (its first half the mean); peft merges the mean."""

from __future__ import annotations

import torch

from . import vera
from .base import DROPOUT, REFUSE, Tuner

FIELDS = {
    **{k: v for k, v in vera.FIELDS.items() if k != "vera_dropout"},
    "pvera_dropout": DROPOUT,
    # without the projections in the file they would have to be drawn again; not implemented for PVeRA
    "save_projection": REFUSE,
    "projection_prng_key": "ignored: it drew the shared projections, which the adapter file holds",
    "sample_at_inference": "ignored: only the unmerged forward samples; peft's merge uses the mean",
    "generator_seed": "ignored: seeds the sampling of the unmerged forward; peft's merge uses the mean",
}
SHARED = ("pvera_A", "pvera_B")  # saved once, as base_model.pvera_A / base_model.pvera_B


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's PVeRA Linear.get_delta_weight: (lambda_b * B[:out]) @ (lambda_d * A[:, :in]), over the first (mean)
    halves of lambda_d and of A's rows."""
    out_features, in_features = weight.shape
    a = shared["pvera_A"].float()[:, :in_features]
    b = shared["pvera_B"].float()[:out_features, :]
    lambda_b = tensors["pvera_lambda_b"].float().unsqueeze(-1)
    lambda_d = tensors["pvera_lambda_d"].float().unsqueeze(-1)
    lambda_d = lambda_d[: lambda_d.size(0) // 2, :]
    a = a[: a.size(0) // 2, :]
    return weight + (lambda_b * b) @ (lambda_d * a)


TUNER = Tuner(
    "PVERA",
    FIELDS,
    ("pvera_lambda_b", "pvera_lambda_d"),
    merged_weight,
    accepted={"save_projection": (True,)},
    shared=SHARED,
)
