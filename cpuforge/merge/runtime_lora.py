"""Adapters applied at run time instead of merged: which adapters can be, and the unmerged base they run on.
Their GGUF LoRA files are made by cpuforge.llama.convert_adapter, checked against the merged model by
cpuforge.checks.runtime_lora and timed beside it by cpuforge.evaluate.lora_speed.

A GGUF LoRA (the pinned convert_lora_to_gguf.py) holds low-rank pairs and one `lora_alpha`;
llama.cpp adds scale · alpha / r · B @ A at run time, r read from each pair. So an adapter runs
at run time only if all it does is such pairs: no whole tensors (`modules_to_save`, a resized
vocabulary: llama.cpp #11554), no DoRA, no rsLoRA or per-module alphas (alpha / sqrt(r) and
alpha_pattern have no place in the file), no fan_in_fan_out, no LoRA on an lm_head the base
ties to its embeddings (the converter refuses it). Such adapters add up, so a stack applied at
run time, each at its own alpha / r, is the same model as the stack merged in order.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cpuforge.constants import EMBED, LM_HEAD
from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, read_json
from cpuforge.io.safetensors import safetensors_header
from cpuforge.merge.folders import adapter_shapes
from cpuforge.merge.formats import MLX
from cpuforge.merge.merge import copy_tokenizer
from cpuforge.merge.adapter import Adapter
from cpuforge.merge.plan import Plan, check_inputs

log = logging.getLogger(__name__)


def refusal(adapter: Adapter, base_rows: int, tied: bool) -> str | None:
    """Why `adapter` cannot run as a GGUF LoRA on its base, or None when it can."""
    config = read_json(adapter.folder / "adapter_config.json")
    if adapter.tuner.startswith(MLX):
        return "is an mlx-lm adapter, which the pinned convert_lora_to_gguf.py does not read"
    if adapter.tuner != "LORA":
        return f"is a {adapter.tuner} adapter, and a GGUF LoRA holds only LoRA's low-rank pairs"
    variant = next((lo for lo in adapter.loras if lo.magnitude or lo.init), None)
    if variant:
        what = "DoRA's magnitude vector" if variant.magnitude else f"the {variant.init} residual base it was trained on"
        return f"needs {what}, which a GGUF LoRA (low-rank pairs added to the base) cannot carry"
    if adapter.biases or adapter.rows:
        return "changes biases (lora_bias) or token rows (trainable_token_indices), which a GGUF LoRA cannot carry"
    shapes = adapter_shapes(adapter.weights)
    for target, name in sorted(adapter.replace.items()):
        if target in (EMBED, LM_HEAD) and shapes[name][0] != base_rows:
            return f"resizes the vocabulary ({name}: {shapes[name][0]} rows, the base has {base_rows})"
        if target in (EMBED, LM_HEAD):
            return f"saves {target} whole ({name}), which a GGUF LoRA cannot carry (llama.cpp #11554)"
        return f"replaces {target} whole ({name}); a GGUF LoRA holds only low-rank pairs"
    if config.get("use_rslora"):
        return "uses rsLoRA (scale alpha / sqrt(r)), but llama.cpp scales a GGUF LoRA by alpha / r"
    if any(v != config.get("lora_alpha", 8) for v in (config.get("alpha_pattern") or {}).values()):
        return "sets per-module alphas (alpha_pattern), but a GGUF LoRA holds one lora_alpha"
    if config.get("fan_in_fan_out"):
        return "is stored fan_in_fan_out (transposed), which the pinned converter does not undo"
    if tied and any(lora.target == LM_HEAD for lora in adapter.loras):
        return "adapts lm_head, which this base ties to its embeddings; the pinned converter refuses that"
    return None


def check_runtime(base: Path, adapters: list[Path]) -> Plan:
    """check_inputs, then every adapter must be able to run at run time; raises InputError naming the first
    that cannot, and why."""
    plan = check_inputs(base, adapters)
    embed_shard = plan.base_files[EMBED]
    base_rows = safetensors_header(embed_shard)[EMBED]["shape"][0]
    tied = LM_HEAD not in plan.base_files
    for adapter in plan.adapters:
        reason = refusal(adapter, base_rows, tied)
        if reason:
            raise InputError(
                f"{adapter.folder}: cannot run as a GGUF LoRA (lora_adapters): it {reason}; merging it still works."
            )
    return plan


def make_unmerged_base(base: Path, adapters: list[Path], out: Path) -> None:
    """The base as a HF folder holding the tokenizer the merged model gets (the last adapter's that has one),
    so the unmerged GGUF reads prompts as the merged one does: the base's weights (linked, not copied), its
    config and generation config, the tokenizer files."""
    plan = check_runtime(base, adapters)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for shard in sorted(set(plan.base_files.values())):
            (tmp / shard.name).symlink_to(shard.resolve())
        for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        copy_tokenizer(plan.tokenizer, tmp)
    log.info("unmerged base in %s: weights of %s, tokenizer of %s", out, base, plan.tokenizer)
