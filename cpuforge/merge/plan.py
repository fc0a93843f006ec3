"""The LoRA plan: what each adapter does to each base tensor, checked from headers before any weight is read."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.io.safetensors import weights_header
from cpuforge.merge.adapter import (
    PREFIX,
    Adapter,
    Bias,
    Lora,
    Rows,
    check_selected,
    check_shape,
    layer_index,
    layer_linears,
    listed,
    plan_whole_tensor,
    whole_tensor_target,
)
from cpuforge.merge.folders import base_shards, adapter_weights_file, adapter_shapes, tokenizer_source, tokenizer_size, check_json_files
from cpuforge.merge.formats import (
    MLX,
    MLX_DEFAULT_KEYS,
    MLX_WEIGHTS,
    adapter_format,
    check_mlx_config,
    mlx_layer,
    mlx_modules,
    mlx_selects,
)
from cpuforge.merge.lora import INIT_RESIDUAL, check_lora_config
from cpuforge.merge.tuned import plan_tuned

log = logging.getLogger(__name__)


DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class Plan:
    base_files: dict[str, Path]  # base tensor -> shard
    adapters: list[Adapter]
    shapes: dict[str, list[int]]  # every output tensor's final shape
    dtypes: dict[str, str]  # every base tensor's safetensors dtype
    tied: bool  # the output still ties lm_head to the embeddings
    tokenizer: Path


def pattern_key(patterns: dict | None, module: str) -> str | None:
    """The first key of rank_pattern / alpha_pattern that matches `module`, as peft's get_pattern_key."""
    return next((key for key in patterns or {} if re.match(rf"(.*\.)?({key})$", module)), None)


def lora_scale(config: dict, module: str, rank: int) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) under rsLoRA; per-module alpha from alpha_pattern."""
    key = pattern_key(config.get("alpha_pattern"), module)
    alpha = config["alpha_pattern"][key] if key else config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_config_fields(config_path: Path, config: dict, base: Path, modules: set[str], linear: set[str]) -> None:
    """Fields of adapter_config.json that must name something the base has: target_modules and layers_to_transform."""
    targets = config.get("target_modules") or []  # none named: peft's default, nothing the user said
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, m) for m in modules):
            raise InputError(f"{config_path}: target_modules {targets!r} matches no module of the base {base}.")
    elif isinstance(targets, list):
        for name in targets:
            if not any(listed([name], m) for m in modules):
                raise InputError(
                    f"{config_path}: target_modules names {name!r}, which the base {base} does not have "
                    f"(its layers have {', '.join(sorted(linear))}); this adapter was made for another architecture."
                )
    layers = config.get("layers_to_transform")
    if layers is not None:
        present = {i for m in modules if (i := layer_index(config, m)) is not None}
        for index in [layers] if isinstance(layers, int) else layers:
            if index not in present:
                raise InputError(
                    f"{config_path}: layers_to_transform names layer {index}, but the base {base} has layers "
                    f"{min(present, default=0)} to {max(present, default=-1)}."
                )


def check_patterns(config_path: Path, config: dict, adapted: list[str]) -> None:
    """Every rank_pattern / alpha_pattern key must match a module the adapter adapts, or it means nothing."""
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field_name) or {}:
            if not any(pattern_key({key: 0}, m) for m in adapted):
                raise InputError(
                    f"{config_path}: {field_name} key {key!r} matches none of the modules this adapter's tensors "
                    f"adapt ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in adapted}))})."
                )


def check_rank(config_path: Path, config: dict, module: str, weights: Path, name: str, rank: int) -> None:
    """The rank adapter_config.json gives a module (rank_pattern, else r) must be its tensors' rank."""
    key = pattern_key(config.get("rank_pattern"), module)
    said, field_name = (config["rank_pattern"][key], f"rank_pattern[{key!r}]") if key else (config.get("r", 8), "r")
    if said != rank:
        raise InputError(f"{config_path}: {field_name} is {said}, but {weights.name} tensor {name} has rank {rank}.")


def plan_adapter(folder: Path, shapes: dict[str, list[int]], files: dict[str, Path]) -> Adapter:
    """Check one adapter against the model so far, from headers alone; updates `shapes`."""
    if adapter_format(folder) == MLX:
        return plan_mlx(folder, shapes, files)
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        return plan_tuned(folder, config, shapes, files)
    check_lora_config(config_path, config)
    base = next(iter(files.values())).parent
    modules = {n.removesuffix(".weight") for n in shapes if n.endswith(".weight")}
    linear = layer_linears(shapes)
    check_config_fields(config_path, config, base, modules, linear)
    weights = adapter_weights_file(folder)
    tensors = adapter_shapes(weights)
    adapter = Adapter(folder, weights, config=config)
    for name, shape in sorted(tensors.items()):
        if ".lora_B." in name or name.endswith(".lora_embedding_B") or ".original_module." in name:
            continue  # B is read with its A; original_module is the base's own copy
        if ".lora_A." in name or name.endswith((".lora_embedding_A", MAGNITUDE)):
            continue  # read with their A
        if name.endswith(".lora_velora_embed") and config.get("velora_config"):
            continue  # VeLoRA's training-time projection of activations: no part of the weights
        if name.endswith(TOKENS):
            adapter.rows.append(plan_rows(config_path, config, weights, name, shape, shapes))
            continue
        plan_whole_tensor(adapter, name, shape, shapes, files)
    for name, a_shape in sorted(tensors.items()):
        embedding = name.endswith(".lora_embedding_A")
        if ".lora_A." not in name and not embedding:
            continue
        module = name.removeprefix(PREFIX).split(".lora_A.")[0].removesuffix(".lora_embedding_A")
        b = name.replace(".lora_A.", ".lora_B.").replace("lora_embedding_A", "lora_embedding_B")
        target = f"{module}.weight"
        if b not in tensors:
            raise InputError(f"{weights}: tensor {name} has no matching {b}.")
        if target not in shapes:
            raise InputError(f"{weights}: tensor {name} adapts {target}, which the base model does not have.")
        check_selected(config_path, config, module, linear, weights, name)
        out_features, rank = tensors[b]
        want = [a_shape[1], out_features] if embedding else [out_features, a_shape[1]]
        if a_shape[0] != rank:
            raise InputError(f"{weights}: tensor {name} has rank {a_shape[0]} but {b} has rank {rank}.")
        check_rank(config_path, config, module, weights, name, rank)
        check_shape(weights, name, target, want, shapes, files)
        scale = lora_scale(config, module, rank)
        lora = Lora(target, name, b, scale, embedding, rank=rank)
        lora.magnitude = plan_magnitude(config_path, config, weights, tensors, module, embedding, out_features)
        init = config.get("init_lora_weights", True)
        if init in INIT_RESIDUAL and not embedding:  # peft initialises embeddings plainly
            lora.init = init
        adapter.loras.append(lora)
        if b.removesuffix(".weight") + ".bias" in tensors:
            adapter.biases.append(plan_bias(config_path, weights, tensors, b, module, scale, shapes, base))
    if not adapter.loras and not adapter.replace and not adapter.rows:
        raise InputError(f"{weights}: holds no LoRA or whole tensors.")
    check_patterns(config_path, config, [lora.target.removesuffix(".weight") for lora in adapter.loras])
    return adapter


def plan_mlx(folder: Path, shapes: dict[str, list[int]], files: dict[str, Path]) -> Adapter:
    """An mlx-lm adapter (mlx_lm.lora's adapters.safetensors), as mlx_lm.fuse fuses it: LoRA adds
    scale · (lora_a @ lora_b)ᵀ to each module it names, DoRA then rescales each row to its m (DoRALinear.fuse),
    a full fine-tune's tensors replace the base's; each checked against num_layers and lora_parameters."""
    config_path, weights = folder / "adapter_config.json", folder / MLX_WEIGHTS
    config = read_json(config_path)
    n_layers = len({n.split(".")[2] for n in shapes if n.startswith("model.layers.")})
    kind, layers, params = check_mlx_config(config_path, config, n_layers)
    if not weights.is_file():
        raise InputError(f"{folder}: an mlx-lm adapter_config.json without its {MLX_WEIGHTS}.")
    tensors = adapter_shapes(weights)
    adapter = Adapter(folder, weights, tuner=f"{MLX} {kind}", config=config)
    if kind == "full":  # the trained layers saved whole
        for name, shape in sorted(tensors.items()):
            if mlx_layer(name) not in layers:
                raise InputError(
                    f"{config_path}: num_layers {config['num_layers']} trains layers {min(layers)} to {max(layers)}, "
                    f"but {weights.name} holds {name}."
                )
            plan_whole_tensor(adapter, name, shape, shapes, files)
        return adapter
    keys = set(params.get("keys") or MLX_DEFAULT_KEYS)
    for module, parts in mlx_modules(weights, tensors).items():
        target, a = f"{module}.weight", parts.get("lora_a")
        if a is None or "lora_b" not in parts:
            raise InputError(f"{weights}: module {module} has no {'lora_b' if a else 'lora_a'} tensor.")
        if target not in shapes:
            raise InputError(f"{weights}: tensor {a} adapts {target}, which the base model does not have.")
        if not mlx_selects(module, layers, keys):
            raise InputError(
                f"{config_path}: num_layers {config['num_layers']} and lora_parameters keys {sorted(keys)} do not "
                f"select {module}, but {weights.name} tensor {a} adapts it; mlx-lm would drop that tensor."
            )
        (n_in, rank), (rank_b, n_out) = tensors[a], tensors[parts["lora_b"]]
        if rank != rank_b or rank != params["rank"]:
            raise InputError(
                f"{config_path}: lora_parameters rank is {params['rank']}, but {weights.name} tensors {a} and "
                f"{parts['lora_b']} have ranks {rank} and {rank_b}."
            )
        embedding = target == EMBED  # mlx-lm's LoRAEmbedding: lora_a (rows, r), lora_b (r, dims), no transpose
        check_shape(weights, a, target, [n_in, n_out] if embedding else [n_out, n_in], shapes, files)
        if ("m" in parts) != (kind == "dora"):
            raise InputError(
                f"{config_path}: fine_tune_type is {kind!r}, but {weights.name} "
                f"{'holds' if 'm' in parts else 'has no'} DoRA's magnitude {module}.m."
            )
        if "m" in parts and tensors[parts["m"]] != shapes[target][:1]:
            raise InputError(
                f"{weights}: tensor {parts['m']} has shape {tensors[parts['m']]}, not {shapes[target][:1]}."
            )
        lora = Lora(target, a, parts["lora_b"], float(params["scale"]), embedding, parts.get("m"), rank=rank,
                    transposed_factors=True)  # fmt: skip
        adapter.loras.append(lora)
    if not adapter.loras and not adapter.replace:
        raise InputError(f"{weights}: holds no tensors.")
    return adapter


MAGNITUDE, TOKENS = ".lora_magnitude_vector", ".token_adapter.trainable_tokens_delta"


def plan_magnitude(config_path: Path, config: dict, weights: Path, tensors: dict, module: str, embedding: bool,
                   out_features: int) -> str | None:  # fmt: skip
    """DoRA's magnitude vector of `module`, which use_dora promises and only use_dora allows."""
    name = f"{PREFIX}{module}{MAGNITUDE}"
    if config.get("use_dora") and embedding:
        raise InputError(f"{config_path}: use_dora on the embedding {module} is not implemented in cpuforge's merge.")
    if config.get("use_dora") and name not in tensors:
        raise InputError(f"{config_path}: use_dora is true, but {weights.name} has no magnitude vector {name}.")
    if name in tensors and not config.get("use_dora"):
        raise InputError(
            f"{config_path}: use_dora is false, but {weights.name} holds DoRA's {name}; peft would drop it."
        )
    if name in tensors and tensors[name] != [out_features]:
        raise InputError(f"{weights}: tensor {name} has shape {tensors[name]}, not [{out_features}].")
    return name if name in tensors else None


def plan_bias(config_path: Path, weights: Path, tensors: dict, b: str, module: str, scale: float, shapes: dict,
              base: Path) -> Bias:  # fmt: skip
    """lora_bias's lora_B.bias, added to the base's bias, which peft refuses to do where the base has none."""
    name, target = b.removesuffix(".weight") + ".bias", f"{module}.bias"
    if target not in shapes:
        raise InputError(
            f"{config_path}: lora_bias is true, but the base {base} has no bias {target} for {weights.name} tensor "
            f"{name}; peft refuses this merge too (the base layer has no bias)."
        )
    if tensors[name] != shapes[target]:
        raise InputError(f"{weights}: tensor {name} has shape {tensors[name]}, but {target} has {shapes[target]}.")
    return Bias(target, name, scale)


def plan_rows(config_path: Path, config: dict, weights: Path, name: str, shape: list[int], shapes: dict) -> Rows:
    """trainable_token_indices: the embedding rows a TrainableTokens tensor replaces (peft's index_copy on merge)."""
    module = name.removeprefix(PREFIX).removesuffix(TOKENS)
    target = f"{module}.weight"
    said = config.get("trainable_token_indices")
    if isinstance(said, dict):
        indices = next((v for k, v in said.items() if listed([k], module)), None)
    else:
        indices = said if target == EMBED else None  # a list means the input embeddings
    if indices is None:
        raise InputError(
            f"{config_path}: trainable_token_indices {said!r} names no indices for {weights.name} tensor {name}."
        )
    if target not in shapes:
        raise InputError(f"{weights}: tensor {name} replaces rows of {target}, which the base model does not have.")
    if shape != [len(indices), shapes[target][1]] or max(indices) >= shapes[target][0] or min(indices) < 0:
        raise InputError(
            f"{weights}: tensor {name} has shape {shape}, but trainable_token_indices gives {len(indices)} rows "
            f"(up to {max(indices)}) of {target}, which has shape {shapes[target]}."
        )
    return Rows(target, name, list(indices))


def check_inputs(base: Path, adapters: list[Path]) -> Plan:
    """Every check that needs only headers; raises InputError naming the file at the first problem."""
    files = base_shards(base)
    check_json_files([base, *adapters])
    shapes, dtypes = {}, {}
    for f in sorted(set(files.values())):
        for name, info in weights_header(f).items():
            if name in files:
                shapes[name], dtypes[name] = info["shape"], info["dtype"]
    if EMBED not in shapes:
        raise InputError(f"{base}: no tensor {EMBED}; cpuforge merges LLaMA-family models.")
    tied = LM_HEAD not in shapes  # a base without lm_head reads its embeddings (tie_word_embeddings)
    if tied:
        shapes[LM_HEAD], dtypes[LM_HEAD] = shapes[EMBED], dtypes[EMBED]  # tied: lm_head reads the embeddings
    base_rows = shapes[EMBED][0]
    plans = [plan_adapter(a, shapes, files) for a in adapters]
    if tied and any(LM_HEAD in p.targets() for p in plans):
        tied = False  # an adapter changed lm_head alone: the output needs its own
    if tied:
        del shapes[LM_HEAD]
    tokenizer = tokenizer_source(base, adapters)
    size, source = tokenizer_size(tokenizer)
    rows = shapes[EMBED][0]
    if size > rows:
        raise InputError(f"{source}: tokenizer has {size} tokens but the merged embeddings have {rows} rows.")
    if rows != base_rows and not padded(size, rows):
        raise InputError(
            f"{source}: tokenizer has {size} tokens but the merged embeddings have {rows} rows, which is neither "
            f"{size} nor {size} padded to a multiple of a power of two (pad_to_multiple_of); is the adapter's own "
            "tokenizer missing?"
        )
    if not tied and LM_HEAD in shapes and shapes[LM_HEAD][0] != rows:
        raise InputError(f"{adapters[-1]}: lm_head has {shapes[LM_HEAD][0]} rows but the embeddings have {rows}.")
    return Plan(files, plans, shapes, dtypes, tied, tokenizer)


def padded(size: int, rows: int) -> bool:
    """Whether `rows` embeddings hold a tokenizer of `size` tokens padded to a multiple of a power of two, as
    resize_token_embeddings(n, pad_to_multiple_of=64) pads them (LLaMA-Factory's resize_embedding_layer): the rows
    past the tokenizer are never looked up, and the pinned converter names them [PAD…] tokens."""
    return size <= rows < size + (rows & -rows)


def lora_delta(a, b, scale: float, transpose: bool):
    """scale · B @ A in f32, transposed for embeddings (peft get_delta_weight)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if transpose else delta


def adapter_embedding_rows(adapter: Path) -> int | None:
    for name, shape in adapter_shapes(adapter_weights_file(adapter)).items():
        if whole_tensor_target(name) == EMBED and ".original_module." not in name:
            return shape[0]
    return None
