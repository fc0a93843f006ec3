"""The fields LoHa and LoKr share (peft's LycorisConfig), and their scaling: alpha / r, per module by pattern."""

from __future__ import annotations

from .base import DROPOUT, pattern_value, usual_fields

FIELDS = {
    **usual_fields(lacks="bias"),
    "r": "exact",
    "alpha": "exact",
    "rank_pattern": "exact",
    "alpha_pattern": "exact",
    "rank_dropout": DROPOUT,
    "module_dropout": DROPOUT,
    "use_effective_conv2d": "ignored: it shapes the tensors of convolutions only, and LLaMA's layers are nn.Linear",
}


def scaling(config: dict, module: str) -> float:
    """peft's LycorisLayer scaling alpha / r, each looked up in its pattern by the module's name first."""
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("alpha", 8))
    return alpha / r
