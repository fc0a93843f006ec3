"""VeRA: one pair of frozen random projections shared by all modules, scaled per module by two trained vectors."""

from __future__ import annotations

import math

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, INIT, Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="exclude_modules"),
    "r": "exact",
    # the projections come from the file, or are drawn again from this seed when the file does not hold them
    "projection_prng_key": "exact",
    "save_projection": "exact",
    "vera_dropout": DROPOUT,
    # d_initial only sets lambda_d's starting value; the file holds the trained one
    "d_initial": INIT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
}
# peft saves the shared projections once, as base_model.vera_A and base_model.vera_B
SHARED = ("vera_A", "vera_B")


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's VeRA Linear.get_delta_weight: (lambda_b * B[:out]) @ (lambda_d * A[:, :in]), added to the weight."""
    out_features, in_features = weight.shape
    a = shared["vera_A"].float()[:, :in_features]
    b = shared["vera_B"].float()[:out_features, :]
    lambda_b = tensors["vera_lambda_b"].float().unsqueeze(-1)
    lambda_d = tensors["vera_lambda_d"].float().unsqueeze(-1)
    return weight + (lambda_b * b) @ (lambda_d * a)


def projections(config: dict, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The shared projections peft draws when save_projection is false: kaiming-uniform from projection_prng_key,
    vera_A (r × largest in) then vera_B (largest out × r), on the CPU generator (peft's
    VeraModel._init_vera_A_vera_B).
    `shapes` are the (out, in) shapes of every adapted module's weight."""
    out_dim = max(s[0] for s in shapes)
    in_dim = max(s[1] for s in shapes)
    r = config.get("r", 256)
    generator = torch.Generator(device="cpu").manual_seed(config.get("projection_prng_key", 0))
    drawn = {}
    for name, shape in (("vera_A", (r, in_dim)), ("vera_B", (out_dim, r))):
        std = math.sqrt(2) / math.sqrt(shape[1])  # torch's fan_in of a 2-D tensor is its column count
        bound = math.sqrt(3.0) * std  # in peft's order, so the float bound is bit for bit peft's
        drawn[name] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return drawn


TUNER = Tuner("VERA", FIELDS, ("vera_lambda_b", "vera_lambda_d"), merged_weight,
              shared=SHARED, make_shared=projections)  # fmt: skip
