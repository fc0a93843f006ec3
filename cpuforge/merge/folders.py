"""The base's and the adapters' folders as files: which hold the weights, the tokenizer and the JSON that
every step reads, checked before any weight is read (a quantized base is named here)."""

from __future__ import annotations

from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.io.safetensors import weights_header

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


# the weights of a HF folder, in transformers' order of preference: safetensors, then the PyTorch
# .bin files of the seed's era (LLaMA and Chinese-LLaMA bases of 2023)
WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


# buffers that transformers before 4.31 saved with LLaMA's weights; recomputed from the config since
SKIPPED = (".rotary_emb.inv_freq",)


def base_shards(base: Path) -> dict[str, Path]:
    """Map each base tensor name to the weights file (safetensors or .bin) that holds it."""
    if not base.is_dir():
        raise InputError(f"{base}: base model folder not found.")
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a HF model folder (no config.json).")
    check_not_quantized(base / "config.json")
    for index_name, single in WEIGHT_FILES:
        index = base / index_name
        if index.is_file():
            files = {name: base / f for name, f in read_json(index)["weight_map"].items()}
            break
        if (base / single).is_file():
            files = dict.fromkeys(weights_header(base / single), base / single)
            break
    else:
        raise InputError(f"{base}: no model.safetensors, pytorch_model.bin or their .index.json.")
    for f in set(files.values()):
        if not f.is_file():
            raise InputError(f"{f}: shard named in {index.name} is missing.")
    return {name: f for name, f in files.items() if not name.endswith(SKIPPED)}


def quantization_name(quantization: dict) -> str:
    """How a quantization_config names itself: its method, and its bits where it says (bitsandbytes 4-bit)."""
    method = quantization.get("quant_method", "unknown method")
    if quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
        return f"{method} {4 if quantization.get('load_in_4bit') else 8}-bit"
    bits = quantization.get("bits") or quantization.get("w_bit")
    return f"{method} {bits}-bit" if bits else str(method)


def check_not_quantized(config_path: Path) -> None:
    """A base saved quantized (QLoRA's bitsandbytes download, GPTQ, AWQ, …) stores packed integers, not the
    weights a merge adds to: named here, before its shapes would blame the adapter."""
    quantization = read_json(config_path).get("quantization_config")
    if quantization:
        name = quantization_name(quantization) if isinstance(quantization, dict) else repr(quantization)
        raise InputError(
            f"{config_path}: this base model is quantized (quantization_config: {name}), and cpuforge merges into "
            "16- or 32-bit weights; give the 16-bit model it was quantized from."
        )


def merged_shard_name(shard: Path) -> str:
    """The merged folder's safetensors name for a base shard: pytorch_model-00001-of-00002.bin
    becomes model-00001-of-00002.safetensors, as transformers names them."""
    if shard.suffix == ".safetensors":
        return shard.name
    return shard.name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"


# a peft adapter's weights, as save_pretrained names them (safe_serialization, or not)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_weights_file(adapter: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter / name).is_file():
            return adapter / name
    raise InputError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin.")


def adapter_shapes(path: Path) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in weights_header(path).items()}


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


# the JSON files of the base's and the adapters' folders that the merge, the checks and transformers read
JSON_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def check_json_files(folders: list[Path]) -> None:
    """Parse each of them in full now, so a broken one is named (file, line, column) before any rule runs."""
    for folder in folders:
        for name in JSON_FILES:
            if (folder / name).is_file():
                read_json(folder / name)
