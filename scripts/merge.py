"""Merge LoRA adapters into their base model, tensor by tensor, straight from safetensors.

    python -m scripts.merge --base BASE --adapter A1 [--adapter A2 ...] --out MERGED

Adapters are applied in the order given. Every input is checked from its
headers before any weight is read; then each base shard is read one tensor at
a time, its LoRA deltas are added in f32, and the shard is written out, so
peak memory is one shard plus the adapters, not the model. The merged folder
gets the base's config and the tokenizer files of the last adapter that has
them (else the base's): no file needs copying by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from scripts.common import (
    InputError,
    atomic_output,
    check_threads,
    read_json,
    run,
    safetensors_header,
    write_provenance,
)

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


@dataclass
class Lora:
    """One adapted weight: base tensor name, the adapter's A and B names, its scale."""

    target: str
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool


def base_shards(base: Path) -> dict[str, Path]:
    """Map each base tensor name to the safetensors file that holds it."""
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
    return {k: list(t.shape) for k, t in load_adapter_tensors(path).items()}


def load_adapter_tensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def lora_scale(config: dict, module: str, rank: int) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) under rsLoRA; per-module alpha from alpha_pattern."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def plan_adapter(adapter: Path, base_tensors: dict[str, list[int]], base_file: dict[str, Path]) -> list[Lora]:
    """Check one adapter against the base from headers alone and list the weights it changes."""
    config_path = adapter / "adapter_config.json"
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise InputError(f"{config_path}: peft_type {config.get('peft_type')!r} cannot be merged linearly; only LORA can.")
    if config.get("use_dora"):
        raise InputError(f"{config_path}: DoRA adapters (use_dora) are not linear merges; cpuforge will not merge them.")
    weights = adapter_weights_file(adapter)
    shapes = adapter_shapes(weights)
    plan = []
    for name, a_shape in sorted(shapes.items()):
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise InputError(f"{weights}: tensor {name} is not a LoRA A/B matrix; cpuforge cannot merge it yet.")
            continue
        module = name.removeprefix(PREFIX).split(".lora_A.")[0]
        target, b = f"{module}.weight", name.replace(".lora_A.", ".lora_B.")
        if b not in shapes:
            raise InputError(f"{weights}: tensor {name} has no matching {b}.")
        if target not in base_tensors:
            raise InputError(f"{weights}: tensor {name} adapts {target}, which the base model does not have.")
        out_features, rank = shapes[b]
        in_features = a_shape[1]
        want = [in_features, out_features] if config.get("fan_in_fan_out") else [out_features, in_features]
        if base_tensors[target] != want or a_shape[0] != rank:
            raise InputError(
                f"{weights}: tensor {name} expects {target} of shape {want}, but {base_file[target]} has "
                f"{base_tensors[target]}; this adapter was made for another base model."
            )
        plan.append(Lora(target, name, b, lora_scale(config, module, rank), bool(config.get("fan_in_fan_out"))))
    if not plan:
        raise InputError(f"{weights}: holds no LoRA tensors.")
    return plan


def tokenizer_source(base: Path, adapters: list[Path]) -> Path:
    """The last adapter that brings tokenizer files, else the base."""
    for folder in [*reversed(adapters), base]:
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return folder
    raise InputError(f"{base}: no tokenizer.json or tokenizer.model here or in any adapter.")


def check_inputs(base: Path, adapters: list[Path]) -> list[list[Lora]]:
    """Every check that needs only headers; raises InputError naming the file at the first problem."""
    files = base_shards(base)
    shapes = {}
    for f in sorted(set(files.values())):
        shapes.update({k: v["shape"] for k, v in safetensors_header(f).items()})
    tokenizer_source(base, adapters)
    return [plan_adapter(a, shapes, files) for a in adapters]


def lora_delta(a, b, scale: float, fan_in_fan_out: bool):
    """scale · B @ A in f32, transposed for fan_in_fan_out layers (peft get_delta_weight)."""
    delta = (b.float() @ a.float()) * scale
    return delta.T if fan_in_fan_out else delta


def merge(base: Path, adapters: list[Path], out: Path, dtype: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    plans = check_inputs(base, adapters)
    files = base_shards(base)
    loras = {}
    for adapter, plan in zip(adapters, plans, strict=True):
        tensors = load_adapter_tensors(adapter_weights_file(adapter))
        for lora in plan:
            loras.setdefault(lora.target, []).append((tensors[lora.a], tensors[lora.b], lora))
    out_dtype = getattr(torch, DTYPES[dtype])
    shards = sorted(set(files.values()))
    with atomic_output(out) as tmp:
        tmp.mkdir()
        total = 0
        for i, shard in enumerate(shards, 1):
            merged = {}
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    weight = f.get_tensor(name)
                    if name in loras:
                        # merge in f32: half-precision matmuls are slow on many CPUs and lose bits
                        weight = weight.float()
                        for a, b, lora in loras[name]:
                            weight += lora_delta(a, b, lora.scale, lora.fan_in_fan_out)
                        if not torch.isfinite(weight).all():
                            raise InputError(f"{shard}: merging into {name} gives non-finite values.")
                    merged[name] = weight.to(out_dtype).contiguous()
                    total += merged[name].numel() * merged[name].element_size()
            save_file(merged, tmp / shard.name, metadata={"format": "pt"})
            log.info("merged shard %d/%d: %s (%d tensors)", i, len(shards), shard.name, len(merged))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {k: v.name for k, v in sorted(files.items())}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = read_json(base / "config.json")
        config["dtype"] = DTYPES[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (base / "generation_config.json").is_file():
            shutil.copy2(base / "generation_config.json", tmp)
        source = tokenizer_source(base, adapters)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        log.info("tokenizer files taken from %s", source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="HF model folder")
    parser.add_argument("--adapter", type=Path, action="append", required=True, help="PEFT LoRA folder; repeat, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="dtype of the merged weights")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(check_threads(args.threads))
    merge(args.base, args.adapter, args.out, args.dtype)
    write_provenance(
        args.out, {"base": args.base, **{f"adapter{i}": a for i, a in enumerate(args.adapter, 1)}},
        step="merge", dtype=args.dtype,
    )  # fmt: skip
    log.info("merged model written to %s", args.out)


if __name__ == "__main__":
    run(main)
