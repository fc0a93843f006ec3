"""What an adapter does to the base, as every tuner's plan states it (cpuforge.merge.plan for LoRA,
cpuforge.merge.tuned for the others): the tensors it replaces whole and the deltas it adds, and the checks
those plans share: which modules its config selects, which base tensor a whole tensor stands for, and a
tensor's shape against the base's."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError

PREFIX = "base_model.model."


@dataclass
class Lora:
    """One LoRA delta: scale · B @ A added to `target`, transposed for embeddings; under DoRA each row then
    rescaled to `magnitude`; under PiSSA / OLoRA added to the residual base its initialisation left (`init`)."""

    target: str
    a: str
    b: str
    scale: float
    transpose: bool
    magnitude: str | None = None  # DoRA's magnitude vector
    init: str | None = None  # "pissa" or "olora": the base is first replaced by its residual
    rank: int = 0
    transposed_factors: bool = False  # mlx-lm's layout: Aᵀ (in, r) and Bᵀ (r, out)


@dataclass
class Bias:
    """lora_bias: scale · lora_B.bias added to the base's bias `target`."""

    target: str
    tensor: str
    scale: float


@dataclass
class Rows:
    """trainable_token_indices: the rows `indices` of `target` replaced by the tensor's rows."""

    target: str
    tensor: str
    indices: list[int]


@dataclass
class Tuned:
    """One module's tensors of a tuner other than LoRA (cpuforge.merge.tuners), merged into `target`, its weight
    or (where the tuner changes biases, as IA3 does) its bias."""

    target: str
    module: str
    tensors: dict[str, str]  # suffix -> adapter tensor
    bias: bool = False


@dataclass
class Adapter:
    """What one adapter does to the base: whole tensors it replaces, then the deltas it adds."""

    folder: Path
    weights: Path
    replace: dict[str, str] = field(default_factory=dict)  # target -> adapter tensor
    loras: list[Lora] = field(default_factory=list)
    biases: list[Bias] = field(default_factory=list)
    rows: list[Rows] = field(default_factory=list)
    tuner: str = "LORA"  # adapter_config.json's peft_type
    config: dict = field(default_factory=dict)
    tuned: list[Tuned] = field(default_factory=list)  # planned by cpuforge.merge.tuned
    shared: dict[str, str] = field(default_factory=dict)  # a tuner's tensors shared by all modules (VeRA's)
    module_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each module a tuner adapts
    drawn: dict = field(default_factory=dict)  # shared tensors the file lacks, drawn again by the tuner once

    def targets(self) -> set[str]:
        """Every base tensor this adapter changes."""
        return {*self.replace, *(x.target for x in [*self.loras, *self.biases, *self.rows, *self.tuned])}


# what peft targets when adapter_config.json names no target_modules, for LLaMA-family models
# (peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = ["q_proj", "v_proj"]


def listed(names: list[str] | None, module: str) -> bool:
    return any(module == n or module.endswith("." + n) for n in names or [])


def layer_index(config: dict, module: str) -> int | None:
    """The layer number in `module`'s name, found as peft finds it (layers_pattern, else the first number)."""
    patterns = config.get("layers_pattern") or [r"[^.]*"]
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if match := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module):
            return int(match["idx"])
    return None


def selects(config: dict, module: str, linear: set[str]) -> bool:
    """Whether peft puts a LoRA layer on `module` for this config (peft's check_target_module_exists,
    with "all-linear" meaning the base's `linear` layer names)."""
    excluded = config.get("exclude_modules")
    if re.fullmatch(excluded, module) if isinstance(excluded, str) else listed(excluded, module):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules") or DEFAULT_TARGETS
    if targets == "all-linear":
        targets = sorted(linear)
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not listed(targets, module):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(config, module)
    return index is not None and index in ([layers] if isinstance(layers, int) else layers)


def layer_linears(shapes: dict[str, list[int]]) -> set[str]:
    """The names of the layers' linear modules: what peft's "all-linear" means, and what a user may target."""
    return {n.split(".")[-2] for n, shape in shapes.items() if ".layers." in n and len(shape) == 2}


def check_selected(config_path: Path, config: dict, module: str, linear: set[str], weights: Path, name: str) -> None:
    """A tensor of a module that the config's selection fields do not select is one peft drops on loading."""
    if not selects(config, module, linear):
        raise InputError(
            f"{config_path}: target_modules {config.get('target_modules') or DEFAULT_TARGETS} (layers_to_transform "
            f"{config.get('layers_to_transform')}) do not select {module}, but {weights.name} tensor {name} "
            "adapts it; peft would drop that tensor."
        )


def whole_tensor_target(name: str) -> str:
    """The base tensor an adapter's whole tensor stands for: peft saves resized layers as
    `<module>.base_layer.weight`, and `modules_to_save` copies as
    `<module>.modules_to_save.weight` (other versions: `.modules_to_save.<adapter>.weight`)."""
    parts = name.removeprefix(PREFIX).replace(".base_layer.", ".").split(".")
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        del parts[i : i + 1 if i + 2 == len(parts) else i + 2]
    return ".".join(parts)


def check_shape(weights: Path, name: str, target: str, want: list[int], shapes: dict, files: dict) -> None:
    if shapes[target] != want:
        where = files.get(target, "the adapters before it")
        raise InputError(
            f"{weights}: tensor {name} expects {target} of shape {want}, but {where} has "
            f"{shapes[target]}; this adapter was made for another base model."
        )


def plan_whole_tensor(adapter: Adapter, name: str, shape: list[int], shapes: dict, files: dict) -> None:
    """A tensor the adapter holds whole (modules_to_save, resized embeddings): it replaces the base's."""
    target = whole_tensor_target(name)
    if target not in shapes:
        raise InputError(f"{adapter.weights}: tensor {name} replaces {target}, which the base model does not have.")
    if shape != shapes[target] and not (target in (EMBED, LM_HEAD) and shape[1:] == shapes[target][1:]):
        check_shape(adapter.weights, name, target, shape, shapes, files)
    adapter.replace[target] = name
    shapes[target] = shape
