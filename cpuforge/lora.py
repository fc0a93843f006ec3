"""The LoRA plan: what each adapter does to each base tensor, checked from headers before any weight is read."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.files import read_json
from cpuforge.safetensors_io import safetensors_header

log = logging.getLogger(__name__)


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


PREFIX = "base_model.model."


EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Lora:
    """One LoRA delta: scale · B @ A added to `target`, transposed for embeddings and fan_in_fan_out."""

    target: str
    a: str
    b: str
    scale: float
    transpose: bool


@dataclass
class Adapter:
    """What one adapter does to the base: whole tensors it replaces, then the deltas it adds."""

    folder: Path
    weights: Path
    replace: dict[str, str] = field(default_factory=dict)  # target -> adapter tensor
    loras: list[Lora] = field(default_factory=list)


@dataclass
class Plan:
    base_files: dict[str, Path]  # base tensor -> shard
    adapters: list[Adapter]
    shapes: dict[str, list[int]]  # every output tensor's final shape
    dtypes: dict[str, str]  # every base tensor's safetensors dtype
    tied: bool  # the output still ties lm_head to the embeddings
    tokenizer: Path


def base_shards(base: Path) -> dict[str, Path]:
    """Map each base tensor name to the safetensors file that holds it."""
    if not base.is_dir():
        raise InputError(f"{base}: base model folder not found.")
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a HF model folder (no config.json).")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = {name: base / f for name, f in read_json(index)["weight_map"].items()}
    elif (base / "model.safetensors").is_file():
        files = dict.fromkeys(safetensors_header(base / "model.safetensors"), base / "model.safetensors")
    else:
        raise InputError(f"{base}: no model.safetensors or model.safetensors.index.json.")
    for f in set(files.values()):
        if not f.is_file():
            raise InputError(f"{f}: shard named in {index.name} is missing.")
    return files


def adapter_weights_file(adapter: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return adapter / name
    raise InputError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin.")


def adapter_shapes(path: Path) -> dict[str, list[int]]:
    if path.suffix == ".safetensors":
        return {k: v["shape"] for k, v in safetensors_header(path).items()}
    return {k: list(t.shape) for k, t in load_bin(path).items()}


def load_bin(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a PyTorch state dict ({e}).") from None


def lora_scale(config: dict, module: str, rank: int) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) under rsLoRA; per-module alpha from alpha_pattern."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


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


def plan_adapter(folder: Path, shapes: dict[str, list[int]], files: dict[str, Path]) -> Adapter:
    """Check one adapter against the model so far, from headers alone; updates `shapes`."""
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: peft_type {config.get('peft_type')!r} cannot be merged linearly; only LORA can.")
    if config.get("use_dora"):
        raise InputError(f"{config_path}: DoRA adapters (use_dora) are not linear merges; cpuforge will not merge them.")
    weights = adapter_weights_file(folder)
    tensors = adapter_shapes(weights)
    adapter = Adapter(folder, weights)
    for name, shape in sorted(tensors.items()):
        if ".lora_B." in name or name.endswith(".lora_embedding_B") or ".original_module." in name:
            continue  # B is read with its A; original_module is the base's own copy
        if ".lora_A." in name or name.endswith(".lora_embedding_A"):
            continue
        target = whole_tensor_target(name)
        if target not in shapes:
            raise InputError(f"{weights}: tensor {name} replaces {target}, which the base model does not have.")
        if shape != shapes[target] and not (target in (EMBED, LM_HEAD) and shape[1:] == shapes[target][1:]):
            check_shape(weights, name, target, shape, shapes, files)
        adapter.replace[target] = name
        shapes[target] = shape
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
        out_features, rank = tensors[b]
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        want = [a_shape[1], out_features] if transpose else [out_features, a_shape[1]]
        if a_shape[0] != rank:
            raise InputError(f"{weights}: tensor {name} has rank {a_shape[0]} but {b} has rank {rank}.")
        check_shape(weights, name, target, want, shapes, files)
        adapter.loras.append(Lora(target, name, b, lora_scale(config, module, rank), transpose))
    if not adapter.loras and not adapter.replace:
        raise InputError(f"{weights}: holds no LoRA or whole tensors.")
    return adapter


def tokenizer_source(base: Path, adapters: list[Path]) -> Path:
    """The last adapter that brings tokenizer files, else the base."""
    for folder in [*reversed(adapters), base]:
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return folder
    raise InputError(f"{base}: no tokenizer.json or tokenizer.model here or in any adapter.")


def tokenizer_size(folder: Path) -> tuple[int, Path]:
    """Number of token ids the tokenizer in `folder` can produce, and the file that says so."""
    added = {}
    if (folder / "tokenizer.json").is_file():
        source = folder / "tokenizer.json"
        data = read_json(source)
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens", [])]
        return max(ids) + 1, source
    import sentencepiece

    source = folder / "tokenizer.model"
    n = sentencepiece.SentencePieceProcessor(model_file=str(source)).get_piece_size()
    if (folder / "added_tokens.json").is_file():
        added = read_json(folder / "added_tokens.json")
    return max([n - 1, *added.values()]) + 1, source


def check_inputs(base: Path, adapters: list[Path]) -> Plan:
    """Every check that needs only headers; raises InputError naming the file at the first problem."""
    files = base_shards(base)
    shapes, dtypes = {}, {}
    for f in sorted(set(files.values())):
        for name, info in safetensors_header(f).items():
            shapes[name], dtypes[name] = info["shape"], info["dtype"]
    if EMBED not in shapes:
        raise InputError(f"{base}: no tensor {EMBED}; cpuforge merges LLaMA-family models.")
    tied = LM_HEAD not in shapes  # a base without lm_head reads its embeddings (tie_word_embeddings)
    if tied:
        shapes[LM_HEAD], dtypes[LM_HEAD] = shapes[EMBED], dtypes[EMBED]  # tied: lm_head reads the embeddings
    base_rows = shapes[EMBED][0]
    plans = [plan_adapter(a, shapes, files) for a in adapters]
    if tied and any(LM_HEAD in p.replace or any(lo.target == LM_HEAD for lo in p.loras) for p in plans):
        tied = False  # an adapter changed lm_head alone: the output needs its own
    if tied:
        del shapes[LM_HEAD]
    tokenizer = tokenizer_source(base, adapters)
    size, source = tokenizer_size(tokenizer)
    rows = shapes[EMBED][0]
    if (rows != base_rows and size != rows) or size > rows:
        raise InputError(f"{source}: tokenizer has {size} tokens but the merged embeddings have {rows} rows.")
    if not tied and LM_HEAD in shapes and shapes[LM_HEAD][0] != rows:
        raise InputError(f"{adapters[-1]}: lm_head has {shapes[LM_HEAD][0]} rows but the embeddings have {rows}.")
    return Plan(files, plans, shapes, dtypes, tied, tokenizer)


def lora_delta(a, b, scale: float, transpose: bool):
    """scale · B @ A in f32, transposed for embeddings and fan_in_fan_out layers (peft get_delta_weight)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if transpose else delta


def adapter_embedding_rows(adapter: Path) -> int | None:
    for name, shape in adapter_shapes(adapter_weights_file(adapter)).items():
        if whole_tensor_target(name) == EMBED and ".original_module." not in name:
            return shape[0]
    return None
