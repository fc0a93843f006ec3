"""What an adapter given to the merge is, from its files: a peft adapter folder (its adapter_config.json then
validated by peft's own config class), an mlx-lm adapter (mlx_lm.lora's LoRA, DoRA or full fine-tune), or a
format cpuforge does not merge, refused in one sentence that names it and says what to give instead."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.io.gguf import GGUF_MAGIC, read_metadata
from cpuforge.merge.folders import ADAPTER_WEIGHTS
from cpuforge.merge.lora import describe as describe_peft

PEFT, MLX = "peft", "mlx-lm"

# mlx-lm's adapter_config.json is mlx_lm.lora's arguments, saved whole (data, optimizer, iterations, …); its own
# loader (mlx_lm.tuner.utils.load_adapters, which mlx_lm.fuse uses) reads only fine_tune_type, num_layers and
# lora_parameters, so only they can change the fused weights, and every other key is a training option
MLX_WEIGHTS = "adapters.safetensors"
MLX_TUNE_TYPES = ("lora", "dora", "full")
# LoRALinear.from_base reads rank, scale and dropout; linear_to_lora_layers reads keys
MLX_LORA_PARAMETERS = {
    "rank": "exact",  # checked against the tensors' rank
    "scale": "exact",
    "keys": "exact",  # the modules of each layer it adapts; checked against the tensors
    "dropout": "ignored: dropout acts in training only; mlx_lm.fuse applies none",
    "alpha": "ignored: mlx_lm.lora's defaults write it, but its LoRALinear scales by `scale` alone",
}
# what mlx-lm adapts on LLaMA-family models when lora_parameters names no keys (linear_to_lora_layers)
MLX_DEFAULT_KEYS = ("self_attn.q_proj", "self_attn.v_proj")


def adapter_format(path: Path) -> str:
    """PEFT or MLX; any other thing given as an adapter raises InputError naming what it is and what to give."""
    if path.is_file():
        raise InputError(file_refusal(path))
    if not path.is_dir():
        raise InputError(f"{path}: adapter folder not found.")
    config = path / "adapter_config.json"
    if config.is_file():
        return MLX if is_mlx_config(read_json(config)) else PEFT
    weights = next((path / n for n in (*ADAPTER_WEIGHTS, MLX_WEIGHTS) if (path / n).is_file()), None)
    if weights:
        raise InputError(without_config(weights))
    if (path / "config.json").is_file() and (
        any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    ):
        raise InputError(
            f"{path}: a full model (config.json and its weights), not an adapter (no adapter_config.json); a fully "
            "fine-tuned model is already merged, so give it as the model's base, not as an adapter."
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise InputError(file_refusal(ggufs[0]))
    raise InputError(f"{path}: no adapter_config.json, so not a peft or mlx-lm adapter folder.")


def is_mlx_config(config: dict) -> bool:
    """mlx_lm.lora's arguments, not a peft config: no peft_type, and mlx-lm's own keys."""
    return "peft_type" not in config and ("fine_tune_type" in config or "lora_parameters" in config)


def without_config(weights: Path) -> str:
    """Why adapter weights without their adapter_config.json are refused: the scale of every delta is only there."""
    if weights.name == MLX_WEIGHTS:
        return (
            f"{weights}: mlx-lm adapter weights without the adapter_config.json mlx_lm.lora saved beside them, which "
            f"holds their num_layers and lora_parameters (rank, scale); copy that file into {weights.parent}."
        )
    return (
        f"{weights}: adapter weights without their adapter_config.json, which peft needs to merge them (lora_alpha, "
        "which scales every delta, is only there); copy the adapter_config.json that save_pretrained wrote beside "
        f"them into {weights.parent}."
    )


def file_refusal(path: Path) -> str:
    """Why a file given where an adapter folder belongs is refused, by what the file is."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        fields = read_metadata(path, ["general.type", "adapter.type"])
        if fields.get("general.type") == "adapter":
            return (
                f"{path}: a llama.cpp GGUF adapter (adapter.type {fields.get('adapter.type')}), which cpuforge cannot "
                "merge into a HF base; give the peft adapter folder it was converted from (convert_lora_to_gguf.py's "
                "input), or apply the file at run time to the GGUF model (llama-server --lora) or merge it into one "
                "with llama.cpp's llama-export-lora."
            )
        return f"{path}: a GGUF model (general.type {fields.get('general.type', 'model')}), not an adapter folder."
    if path.name in (*ADAPTER_WEIGHTS, MLX_WEIGHTS, "adapter_config.json"):
        if (path.parent / "adapter_config.json").is_file():
            return f"{path}: a file of an adapter; give its folder, {path.parent}."
        return without_config(path)
    return f"{path}: a file, not an adapter folder."


def check_with_peft(adapters: list[Path]) -> None:
    """Load each peft adapter's adapter_config.json with peft's own config class, as PeftModel.from_pretrained
    does: a config peft refuses (its __post_init__ checks, such as a regex target_modules with layers_to_transform)
    is refused in peft's words. Run after the plan (cpuforge.merge.plan.check_inputs), whose field checks name the
    fields peft would only warn about, by the start-up check and the merge: not by every step that plans, since
    importing peft takes 300 MiB and seconds."""
    for folder in adapters:
        if adapter_format(folder) != PEFT:
            continue
        from peft import PeftConfig

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown or run-time keys: the plan's field checks name them
                PeftConfig.from_pretrained(str(folder))
        except (ValueError, TypeError) as e:
            said = str(e).strip()
            raise InputError(
                f"{folder / 'adapter_config.json'}: peft refuses this config: {said}{'' if said.endswith('.') else '.'}"
            ) from None


def check_mlx_config(config_path: Path, config: dict, n_layers: int) -> tuple[str, set[int], dict]:
    """mlx-lm's fine_tune_type, the layers it adapted (the last num_layers; all when num_layers is -1 or 0), and its
    lora_parameters, as mlx_lm's load_adapters reads them; refused by name where they cannot be merged."""
    kind = config.get("fine_tune_type", "lora")  # what load_adapters assumes when the key is absent
    if kind not in MLX_TUNE_TYPES:
        raise InputError(
            f"{config_path}: fine_tune_type is {kind!r}; mlx-lm's loader knows only {', '.join(MLX_TUNE_TYPES)}."
        )
    num_layers = config.get("num_layers")
    if not isinstance(num_layers, int):
        raise InputError(f"{config_path}: num_layers is {num_layers!r}, not the number of layers mlx-lm adapted.")
    if num_layers > n_layers:
        raise InputError(
            f"{config_path}: num_layers is {num_layers}, but the base has {n_layers} layers; this adapter was made "
            "for another base model."
        )
    layers = set(range(n_layers - num_layers if num_layers > 0 else 0, n_layers))
    params = config.get("lora_parameters") or {}
    for key, value in params.items():
        if key not in MLX_LORA_PARAMETERS:
            raise InputError(
                f"{config_path}: lora_parameters key {key!r} (value {value!r}) is none of those mlx-lm's loader reads "
                f"({', '.join(MLX_LORA_PARAMETERS)}), so cpuforge cannot tell what it does to the merged weights."
            )
    if kind != "full":
        for key in ("rank", "scale"):
            if not isinstance(params.get(key), (int, float)):
                raise InputError(f"{config_path}: lora_parameters has no number {key!r} (it has {params!r}).")
    return kind, layers, params


# mlx-lm's LoRALinear and DoRALinear save lora_a (in, r), lora_b (r, out) and, for DoRA, the magnitude m
MLX_PARTS = ("lora_a", "lora_b", "m")


def mlx_modules(weights: Path, tensors: dict) -> dict[str, dict[str, str]]:
    """The adapted modules of an mlx-lm LoRA or DoRA file: module -> {part: tensor name}."""
    modules: dict[str, dict[str, str]] = {}
    for name in sorted(tensors):
        module, _, part = name.rpartition(".")
        if part not in MLX_PARTS:
            raise InputError(f"{weights}: tensor {name} is none of mlx-lm's LoRA tensors ({', '.join(MLX_PARTS)}).")
        modules.setdefault(module, {})[part] = name
    return modules


def mlx_layer(name: str) -> int | None:
    """The layer a module or tensor of mlx-lm's model tree is in (model.layers.N.…), None outside the layers."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None


def mlx_selects(module: str, layers: set[int], keys: set[str]) -> bool:
    """Whether mlx-lm's linear_to_lora_layers adapts `module`: a key of one of the last num_layers layers (a name
    inside the layer, "self_attn.q_proj"), or a module of the whole model named by a key ("lm_head")."""
    layer = mlx_layer(module)
    return module in keys or (layer in layers and module.split(".", 3)[3] in keys)


def describe(config: dict) -> str:
    """The adapter of an adapter_config.json as the provenance and the report name it: "mlx-lm dora", or the
    peft tuner with its variants ("LORA (DoRA, rsLoRA)")."""
    return f"{MLX} {config.get('fine_tune_type', 'lora')}" if is_mlx_config(config) else describe_peft(config)
