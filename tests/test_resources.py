"""Jobs ask a scheduler for what their inputs need: a merge's memory follows the largest tensor, not the model.

The big model here is headers over sparse files: 8 shards of 512 MiB (bf16),
4 GiB on paper and almost nothing on disk. Only the dry run looks at it.
"""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
from conftest import REPO, snakemake, write_config

HIDDEN = 8192
SHARDS, PER_SHARD = 8, 4
MIB = 1 << 20


def write_sparse_safetensors(path, shapes: dict[str, list[int]], dtype="BF16", itemsize=2) -> None:
    """A valid safetensors file whose tensors are all zeros that take no disk space."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def make_big_base(folder):
    folder.mkdir()
    weight_map = {}
    for shard in range(SHARDS):
        name = f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors"
        shapes = {
            f"model.layers.{shard * PER_SHARD + i}.self_attn.q_proj.weight": [HIDDEN, HIDDEN] for i in range(PER_SHARD)
        }
        if shard == 0:
            shapes["model.embed_tokens.weight"] = [1024, HIDDEN]
        write_sparse_safetensors(folder / name, shapes)
        weight_map |= dict.fromkeys(shapes, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN}))
    vocab = {f"t{i}": i for i in range(1024)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return folder


def make_small_lora(folder, rank=4):
    from safetensors.numpy import save_file

    folder.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": np.ones((rank, HIDDEN), np.float32),
         f"{prefix}.lora_B.weight": np.ones((HIDDEN, rank), np.float32)},
        folder / "adapter_model.safetensors",
    )  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8}))
    return folder


def merge_resources(workdir, config) -> dict[str, int]:
    out = snakemake(workdir, "-n", "merged_model", "--profile", str(REPO / "profiles" / "slurm"),
                    "--configfile", str(config)).stdout  # fmt: skip
    block = out[out.index("rule merge:") :]
    return {k: int(v) for k, v in re.findall(r"\b(mem_mb|runtime)=(\d+)", block.split("\n\n")[0])}


def test_merge_memory_follows_the_largest_tensor(tmp_path):
    base, adapter = make_big_base(tmp_path / "base"), make_small_lora(tmp_path / "adapter")
    models = [{"name": "big", "base": str(base), "adapters": [str(adapter)]}]
    f32 = merge_resources(tmp_path, write_config(tmp_path / "f32.yaml", models))
    bf16 = merge_resources(tmp_path, write_config(tmp_path / "bf16.yaml", models, merge={"dtype": "bf16"}))

    tensor_f32 = HIDDEN * HIDDEN * 4 // MIB  # 256 MiB
    model_f32 = SHARDS * PER_SHARD * tensor_f32  # 8 GiB
    # the largest tensor and its f32 working copies must fit, and the model need not
    assert 3 * tensor_f32 < f32["mem_mb"] < model_f32 / 2
    assert 3 * tensor_f32 < bf16["mem_mb"] < f32["mem_mb"]
    assert f32["runtime"] > 10
