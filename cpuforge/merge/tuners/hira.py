"""HiRA: a high-rank update, the base weight times (Hadamard) a low-rank product: W + W ⊙ (B @ A)."""

from __future__ import annotations

import torch

from .base import DROPOUT, REFUSE, Tuner, usual_fields

FIELDS = {
    **usual_fields(lacks="bias"),
    "r": "exact",
    "rank_pattern": "exact",  # each module's rank is its tensors' rank
    "hira_dropout": DROPOUT,
    # peft's HiRA passes fan_in_fan_out to nn.Linear layers unchanged, so a true value would transpose the delta
    "fan_in_fan_out": REFUSE,
}


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's HiraLayer._merge: W + W ⊙ (B @ A), the Hadamard factor being the weight before the merge."""
    return weight + weight * (tensors["hira_B"].float() @ tensors["hira_A"].float())


TUNER = Tuner("HIRA", FIELDS, ("hira_A", "hira_B"), merged_weight, accepted={"fan_in_fan_out": (False,)})
