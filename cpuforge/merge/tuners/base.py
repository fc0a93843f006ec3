"""What every tuner module gives the merge: its table of config fields, its config check, its tensors and its math."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cpuforge.errors import InputError

EXACT = "exact"
REFUSE = "refused"

# The fields of peft's PeftConfig, which every tuner config (LoRA's too) inherits.
PEFT_CONFIG_FIELDS = {
    "peft_type": EXACT,  # picks the tuner, and so the formula
    "auto_mapping": "ignored: names the class peft loads the adapter with; no weight depends on it",
    "base_model_name_or_path": "ignored: a label for the base; the merge goes into the base the user gives, checked "
    "against the tensors' shapes (a QLoRA adapter names the quantized repository it trained on, whose 16-bit source "
    "is the right base)",
    "revision": "ignored: a label for the base's revision; the merge goes into the base the user gives",
    "inference_mode": "ignored: only whether the adapter's tensors train; the saved tensors are the same",
    "task_type": "ignored: picks the PeftModel wrapper class; merge_and_unload gives the same base weights",
    "peft_version": "ignored: the peft that saved the adapter; the tensors and the math are what the merge reads",
}

# Fields that decide which modules get adapter layers, on creation and when peft loads the adapter: the merge
# adapts the modules the saved tensors name, and refuses a tensor of a module they do not select (peft drops it).
SELECTION = "exact"
DROPOUT = "ignored: a dropout acts in training only; merge_and_unload applies none"
INIT = "ignored: the starting values of tensors that the adapter file holds as trained"
# modules_to_save copies are whole tensors in the adapter file; the plan puts them in place of the base's.
MODULES_TO_SAVE = "exact"
# peft turns fan_in_fan_out off on nn.Linear layers (it describes GPT-2's Conv1D), and LLaMA's are nn.Linear.
FAN_IN_FAN_OUT_LINEAR = "ignored: peft turns it off on nn.Linear layers, and LLaMA's layers are nn.Linear"

# The fields most tuner configs declare beside PeftConfig's, classified once for all of them (usual_fields).
USUAL_FIELDS = {
    "target_modules": SELECTION,
    "exclude_modules": SELECTION,
    "layers_to_transform": SELECTION,
    "layers_pattern": SELECTION,
    "modules_to_save": MODULES_TO_SAVE,
    "init_weights": INIT,
    "bias": REFUSE,  # other values train the base's biases, saved beside the adapter
}
# the values of a refused usual field that the merge takes, peft's default first
USUAL_ACCEPTED = {"bias": ("none",)}


def usual_fields(lacks: str = "") -> dict:
    """PeftConfig's fields and the usual ones, but those named in `lacks` (space-separated: the fields a tuner's
    config does not have). A tuner's table adds its own after them, which win where it classifies one otherwise."""
    return PEFT_CONFIG_FIELDS | {k: v for k, v in USUAL_FIELDS.items() if k not in lacks.split()}


Merge = Callable[[torch.Tensor, dict, dict, str, dict], torch.Tensor]


@dataclass(frozen=True)
class Tuner:
    """One peft tuner, as the merge sees it.

    `fields` classifies every field of the peft config dataclass (inherited ones too): "exact", "ignored: <why>",
    or "refused" (then `accepts` gives the values accepted, peft's default first: from `accepted`, or USUAL_ACCEPTED).
    `suffixes` are the tensor-name suffixes of one adapted module (`optional` those a module may lack). `shared`
    names the tensors saved once for all modules (VeRA's projections), found in the adapter file as
    `base_model.<shared name>`, or drawn again by `make_shared` where the file lacks them.
    `merged_weight(weight, tensors, config, module, shared)` gives the merged f32 weight;
    `merged_bias(bias, tensors, config, module, shared, weight)` the merged bias (`weight` is the base weight before
    the merge, which GLoRA's bias update reads), or is None where the tuner leaves the biasalone."""

    peft_type: str
    fields: dict[str, str]
    suffixes: tuple[str, ...]
    merged_weight: Merge
    accepted: dict[str, tuple] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    merged_bias: Callable[[torch.Tensor, dict, dict, str, dict, torch.Tensor], torch.Tensor] | None = None
    # (config, [(out, in) of every adapted module]) → the shared tensors, where the file does not hold them
    make_shared: Callable[[dict, list], dict] | None = None
    # peft refuses the merge where the base module has no bias (BEFT); the integrator must refuse it too
    needs_bias: bool = False
    # suffixes that may be absent for a module (e.g. LoHa's CP tensors exist only on convolutions)
    optional: tuple[str, ...] = ()

    def check_config(self, config_path: Path, config: dict) -> None:
        """Raise InputError for a key peft's config class does not have, or a refused field not at its default."""
        for key, value in config.items():
            kind = self.fields.get(key)
            if kind is None:
                raise InputError(
                    f"{config_path}: field {key} = {value!r} is not a field of peft's {self.peft_type} config."
                )
            if kind == REFUSE and not any(same(value, ok) for ok in self.accepts(key)):
                raise InputError(
                    f"{config_path}: {key} = {value!r} changes the merge in a way cpuforge does not implement "
                    f"for {self.peft_type}, which merges only {key} = {self.accepts(key)[0]!r}."
                )

    def accepts(self, key: str) -> tuple:
        """The values of the refused field `key` that the merge takes, peft's default first."""
        return (USUAL_ACCEPTED | self.accepted)[key]


def same(value: object, default: object) -> bool:
    """Equal as JSON would write them: peft saves tuples and sets as lists, and None or an empty container for unset."""
    if isinstance(value, (list, tuple, set)) and isinstance(default, (list, tuple, set)):
        return list(value) == list(default)
    return value == default


def pattern_value(patterns: dict | None, module: str, default):
    """peft's get_pattern_key: the first pattern key that matches the end of the module name wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
