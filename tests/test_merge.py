"""The merge step against peft's own unmerged forward pass, on tiny real models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_lora
from safetensors.torch import load_file

from scripts.common import InputError
from scripts.merge import merge

PROMPTS = torch.tensor([[1, 5, 77, 300, 12, 9, 400, 33], [1, 200, 201, 7, 8, 450, 3, 2]])


def peft_logits(base, adapters):
    """Logits of base + adapters, unmerged, through peft (all adapters active)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        return model(PROMPTS).logits


def merged_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(PROMPTS).logits


def test_merged_model_reproduces_peft_logits(tmp_path, tiny_base, tiny_adapter):
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f32")
    want = peft_logits(tiny_base, [tiny_adapter])
    got = merged_logits(tmp_path / "merged")
    assert (got - want).abs().max() < 1e-5
    assert (merged_logits(tiny_base) - want).abs().max() > 1e-2  # the adapter does change the model


def test_stacked_adapters_with_their_own_rank_alpha_and_rslora(tmp_path, tiny_base):
    first = make_lora(tiny_base, tmp_path / "first", seed=3, r=8, lora_alpha=32, target_modules=["q_proj", "o_proj"])
    second = make_lora(
        tiny_base, tmp_path / "second", seed=4, r=4, lora_alpha=4, use_rslora=True,
        target_modules=["q_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    merge(tiny_base, [first, second], tmp_path / "merged", "f32")
    want = peft_logits(tiny_base, [first, second])
    assert (merged_logits(tmp_path / "merged") - want).abs().max() < 1e-5


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_output_dtype(tmp_path, tiny_base, tiny_adapter, dtype, torch_dtype):
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", dtype)
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == str(torch_dtype)[6:]


def test_merged_folder_carries_the_tokenizer(tmp_path, tiny_base, tiny_adapter):
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f32")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "merged" / name).is_file()
    from transformers import AutoTokenizer

    text = "The with statement is used to wrap the execution of a block."
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(text)["input_ids"] == AutoTokenizer.from_pretrained(
        tiny_base
    )(text)["input_ids"]


def test_failed_merge_leaves_no_output(tmp_path, tiny_base, tiny_adapter):
    """An adapter holding inf fails mid-merge, and no folder with the final name is left."""
    import shutil

    from safetensors.torch import save_file

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in sorted(tensors) if "layers.1" in k and "lora_B" in k)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, adapter / "adapter_model.safetensors")
    out = tmp_path / "merged"
    with pytest.raises(InputError, match="gives non-finite values"):
        merge(tiny_base, [adapter], out, "f32")
    assert not out.exists() and not (tmp_path / "merged.partial").exists()


def test_cli_refuses_zero_threads(tmp_path, tiny_base, tiny_adapter):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.merge", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
         "--out", str(tmp_path / "m"), "--threads", "0"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "threads must be at least 1, got 0." in result.stderr
