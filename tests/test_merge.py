"""The merge step against peft's own unmerged forward pass, on tiny real models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from helpers.llama import convert
from helpers.models import ADDED_WORDS, make_extended_adapter, make_lora, save_seed_era_adapter, save_seed_era_base
from safetensors.torch import load_file

from cpuforge.errors import InputError
from cpuforge.merge.merge import merge

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
    """Matrices in the merge dtype, vectors (the norms) in f32, as the f16 GGUF keeps them."""
    merge(tiny_base, [tiny_adapter], tmp_path / "merged", dtype)
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values() if t.dim() > 1} == {torch_dtype}
    assert {t.dtype for t in tensors.values() if t.dim() == 1} == {torch.float32}
    assert tensors["model.norm.weight"].dim() == 1
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == str(torch_dtype)[6:]


def test_f16_merge_gives_the_f16_gguf_of_an_f32_merge(tmp_path, tiny_base, tiny_adapter, llama_bin):
    """The default dtype loses nothing the f16 GGUF keeps: its tensors are bit for bit those of an f32 merge's."""
    from gguf import GGUFReader

    data = {}
    for dtype in ("f32", "f16"):
        merge(tiny_base, [tiny_adapter], tmp_path / dtype, dtype)
        reader = GGUFReader(convert(tmp_path / dtype, tmp_path / f"{dtype}.gguf"))
        data[dtype] = {t.name: (t.tensor_type.name, bytes(t.data)) for t in reader.tensors}
    assert data["f16"] == data["f32"]
    assert {kind for kind, _ in data["f16"].values()} == {"F16", "F32"}
    sizes = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in data}
    assert sizes["f16"] < 0.6 * sizes["f32"]


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


def reference_logits(base, adapters, ids=PROMPTS):
    from cpuforge.merge.merge import peft_reference

    with torch.no_grad():
        return peft_reference(base, adapters)(ids).logits


def test_extended_vocabulary(tmp_path, tiny_base):
    adapter = make_extended_adapter(tiny_base, tmp_path / "ext")
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 512 + len(ADDED_WORDS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 544 and tokenizer.convert_tokens_to_ids("cpuforgeword7") >= 512
    ids = torch.tensor([[1, 5, 520, 77, 543, 300]])  # includes added tokens
    want = reference_logits(tiny_base, [adapter], ids)
    assert want.shape[-1] == 544
    assert (merged_logits_for(tmp_path / "merged", ids) - want).abs().max() < 1e-5


def merged_logits_for(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


def test_extended_vocabulary_then_a_plain_lora_on_top(tmp_path, tiny_base):
    first = make_extended_adapter(tiny_base, tmp_path / "ext")
    from transformers import AutoModelForCausalLM

    resized = AutoModelForCausalLM.from_pretrained(tiny_base)
    resized.resize_token_embeddings(544, mean_resizing=False)
    resized.save_pretrained(tmp_path / "resized")
    second = make_lora(tmp_path / "resized", tmp_path / "instruct", seed=9, target_modules=["k_proj", "gate_proj"])
    merge(tiny_base, [first, second], tmp_path / "merged", "f32")
    ids = torch.tensor([[1, 5, 520, 77, 543, 300]])
    want = reference_logits(tiny_base, [first, second], ids)
    assert (merged_logits_for(tmp_path / "merged", ids) - want).abs().max() < 1e-5
    # the first adapter's tokenizer is the last one's that has tokenizer files
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()


def test_tied_base_stays_tied(tmp_path):
    from helpers.models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_lora(base, tmp_path / "lora")
    merge(base, [adapter], tmp_path / "merged", "f32")
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert (merged_logits(tmp_path / "merged") - reference_logits(base, [adapter])).abs().max() < 1e-5


def test_tied_base_with_extended_vocabulary(tmp_path):
    from helpers.models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    adapter = make_extended_adapter(base, tmp_path / "ext", targets=("embed_tokens",))
    merge(base, [adapter], tmp_path / "merged", "f32")
    ids = torch.tensor([[1, 5, 520, 77, 543, 300]])
    assert (merged_logits_for(tmp_path / "merged", ids) - reference_logits(base, [adapter], ids)).abs().max() < 1e-5


def test_sharded_base_and_bin_adapter(tmp_path, tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tiny_base / name).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(sharded), lora).save_pretrained(
        tmp_path / "bin", safe_serialization=False
    )
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    merge(sharded, [tmp_path / "bin"], tmp_path / "merged", "f32")
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in sharded.glob("model-*.safetensors")}
    assert (merged_logits(tmp_path / "merged") - reference_logits(sharded, [tmp_path / "bin"])).abs().max() < 1e-5


def test_tokenizer_that_disagrees_with_the_embeddings(tmp_path, tiny_base):
    adapter = make_extended_adapter(tiny_base, tmp_path / "ext")
    import shutil

    shutil.copy(tiny_base / "tokenizer.json", adapter / "tokenizer.json")  # the base's 512-token tokenizer
    with pytest.raises(InputError, match=r"tokenizer.json: tokenizer has 512 tokens but the merged embeddings have 544 rows."):
        merge(tiny_base, [adapter], tmp_path / "merged", "f32")


def test_missing_base(tmp_path, tiny_adapter):
    with pytest.raises(InputError, match="base model folder not found"):
        merge(tmp_path / "nowhere", [tiny_adapter], tmp_path / "merged", "f32")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_verify_against_peft(tmp_path, tiny_base, tiny_adapter, dtype):
    from cpuforge.merge.merge import VERIFY_PROMPTS

    worst = merge(tiny_base, [tiny_adapter], tmp_path / "merged", dtype, VERIFY_PROMPTS)
    assert 0 <= worst < {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2}[dtype]


def test_verify_catches_a_wrong_merge(tmp_path, tiny_base, tiny_adapter, monkeypatch):
    """A merge that forgets LoRA's scale fails verification, and leaves no merged folder."""
    import cpuforge.merge.plan as lora
    import cpuforge.merge.merge as m

    monkeypatch.setattr(lora, "lora_scale", lambda config, module, rank: 1.0)
    with pytest.raises(InputError, match="logits differ from peft's"):
        m.merge(tiny_base, [tiny_adapter], tmp_path / "merged", "f32", m.VERIFY_PROMPTS)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("shards", [1, 3])
def test_seed_era_base_of_bin_shards(tmp_path, tiny_base, shards):
    """A 2023 LLaMA base (f16 pytorch_model .bin shards, inv_freq buffers, no tokenizer.json) merges
    shard by shard into safetensors that give peft's logits."""
    base = save_seed_era_base(tiny_base, tmp_path / "llama-7b-hf", shards)
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "up_proj"])
    merge(base, [adapter], tmp_path / "merged", "f32")
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    if shards == 1:
        assert "model.safetensors" in files
    else:
        index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)}
    assert not [f for f in files if f.endswith(".bin")] and "tokenizer.json" in files
    merged = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        merged |= load_file(f)
    assert not [k for k in merged if "inv_freq" in k] and len(merged) == 21
    assert (merged_logits(tmp_path / "merged") - reference_logits(base, [adapter])).abs().max() < 1e-5


def test_seed_era_adapter_bin_with_resized_vocabulary(tmp_path, tiny_base):
    """A Chinese-LLaMA-style adapter as peft 0.3 saved it (adapter_model.bin, embed_tokens and lm_head
    whole under their plain names) on a .bin base merges to the same tensors as today's layout, and
    to peft's logits."""
    base = save_seed_era_base(tiny_base, tmp_path / "base", 2)
    today = make_extended_adapter(base, tmp_path / "today")
    old = save_seed_era_adapter(today, tmp_path / "2023")
    assert (old / "adapter_model.bin").is_file() and "merge_weights" in (old / "adapter_config.json").read_text()
    merge(base, [old], tmp_path / "merged-2023", "f32")
    merge(base, [today], tmp_path / "merged-today", "f32")
    for f in (tmp_path / "merged-today").glob("*.safetensors"):
        want, got = load_file(f), load_file(tmp_path / "merged-2023" / f.name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.tensor([[1, 5, 520, 77, 543, 300]])
    assert (merged_logits_for(tmp_path / "merged-2023", ids) - reference_logits(base, [old], ids)).abs().max() < 1e-5


def test_fan_in_fan_out_on_linear_layers_is_ignored_as_peft_does(tmp_path, tiny_base):
    """fan_in_fan_out belongs to GPT-2's Conv1D; peft turns it off on nn.Linear, so the merge must not transpose
    (a transposed delta would fit the square q_proj and be wrong, and not fit up_proj at all)."""
    adapter = make_lora(tiny_base, tmp_path / "lora", target_modules=["q_proj", "up_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert (merged_logits(tmp_path / "merged") - peft_logits(tiny_base, [adapter])).abs().max() < 1e-5


def test_rank_and_alpha_patterns_and_layers_to_transform(tmp_path, tiny_base):
    adapter = make_lora(
        tiny_base, tmp_path / "lora", r=4, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 16},
        layers_to_transform=[1], target_modules=["q_proj", "v_proj", "up_proj"],
    )  # fmt: skip
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert (merged_logits(tmp_path / "merged") - peft_logits(tiny_base, [adapter])).abs().max() < 1e-5


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_outputs_get_the_modes_of_the_umask(tmp_path, tiny_base, umask, file_mode, dir_mode):
    """safetensors writes a temporary file (0600) and renames it; what atomic_output hands over has the umask's modes,
    as the demo base (save_pretrained) and every other artifact must."""
    import os

    from transformers import AutoModelForCausalLM

    from cpuforge.io.files import atomic_output

    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "model") as tmp:
            AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(tmp)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model" / "run.sh").stat().st_mode & 0o777 == file_mode | 0o111 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode


def test_a_terminated_step_removes_its_partial_output_and_scratch_files(tmp_path):
    """SIGTERM (kill, SLURM's time limit) in the middle of a step's atomic_output: the step exits 143, and
    neither its .partial output nor its .partial.* scratch files stay behind."""
    import signal
    import textwrap

    step = textwrap.dedent(f"""
        import time
        from cpuforge.cli import run
        from cpuforge.io.files import atomic_output

        def main():
            with atomic_output({str(tmp_path / "out.gguf")!r}) as tmp:
                tmp.write_bytes(b"half")
                tmp.with_name(tmp.name + ".candidate.gguf").write_bytes(b"scratch")
                print("writing", flush=True)
                time.sleep(600)

        run(main)
    """)
    child = subprocess.Popen([sys.executable, "-c", step], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)  # fmt: skip
    assert child.stdout.readline() == "writing\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf.partial", "out.gguf.partial.candidate.gguf"]
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_step_ends_the_tool_it_runs_at_once(tmp_path):
    """SIGTERM while a step waits on a tool's output (run_tool, as every llama.cpp tool runs): the tool is
    killed with the step, which exits 143 at once, not when the tool next prints a line."""
    import os
    import signal
    import textwrap

    tool = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
    step = textwrap.dedent(f"""
        import sys
        from cpuforge.cli import run
        from cpuforge.llama.runtime import run_tool

        run(lambda: run_tool([sys.executable, "-c", {tool!r}]))
    """)
    child = subprocess.Popen([sys.executable, "-c", step], stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = child.stderr.readline()
    while not line.strip().isdigit():  # the step logs the command first, then the tool's own line
        line = child.stderr.readline()
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(int(line), 0)
