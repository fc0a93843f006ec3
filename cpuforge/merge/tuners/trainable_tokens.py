"""Trainable tokens: new values for a few rows of the embedding (the listed token ids); the merge copies them in.

With tied embeddings peft ties the output layer to the same rows; the merged lm_head is then the merged embedding."""

from __future__ import annotations

import torch

from .base import INIT, PEFT_CONFIG_FIELDS, SELECTION, Tuner

FIELDS = {
    **PEFT_CONFIG_FIELDS,
    "token_indices": "exact",
    "target_modules": SELECTION,
    "init_weights": INIT,
}


def indices(config: dict, module: str) -> list[int]:
    """The token ids of this module: a list, or a dict from module name (or its last part) to a list."""
    token_indices = config.get("token_indices") or []
    if isinstance(token_indices, dict):
        for key, value in token_indices.items():
            if module == key or module.endswith("." + key):
                return value
        raise ValueError(f"{module}: no token_indices entry names this module")
    return token_indices


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's TrainableTokensLayer.merge: the saved rows replace the embedding's rows at the token ids, in order."""
    index = torch.tensor(indices(config, module))
    return weight.index_copy(0, index, tensors["trainable_tokens_delta"].float())


TUNER = Tuner("TRAINABLE_TOKENS", FIELDS, ("trainable_tokens_delta",), merged_weight)
