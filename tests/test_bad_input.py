"""Bad input fails at start-up, before any rule runs, with one sentence naming the file or key."""

from __future__ import annotations

import shutil

import pytest
from helpers.models import make_lora, make_tiny_llama
from helpers.workflow import snakemake, write_config


def start(tmp_path, models, **extra):
    """Start the workflow for real (not a dry run) and return what it printed; it must fail."""
    config = write_config(tmp_path / "bad.yaml", models, **extra)
    result = snakemake(tmp_path, "q4_model", "--configfile", str(config), check=False)
    assert result.returncode != 0
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()
    return result.stdout + result.stderr


def model(base, adapter):
    return [{"name": "m", "base": str(base), "adapters": [str(adapter)]}]


def test_unknown_quant_type_suggests_the_closest(tmp_path):
    out = start(tmp_path, [{"name": "demo", "base": "demo", "adapters": ["demo"]}], quant_types=["q4_O"])
    assert "quant_types: unknown llama.cpp quantization type 'q4_O'; did you mean q4_0?" in out


def test_missing_base_folder(tmp_path, tiny_adapter):
    out = start(tmp_path, model(tmp_path / "nowhere", tiny_adapter))
    assert f"config models[m]: {tmp_path / 'nowhere'} is not a folder." in out


def test_malformed_config_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models: [{name: m, base: demo}]\n")
    result = snakemake(tmp_path, "q4_model", "--configfile", str(config), check=False)
    assert result.returncode != 0 and "'adapters' is a required property" in result.stderr


def test_base_without_config_json(tmp_path, tiny_base, tiny_adapter):
    base = shutil.copytree(tiny_base, tmp_path / "base")
    (base / "config.json").unlink()
    out = start(tmp_path, model(base, tiny_adapter))
    assert f"{base}: not a HF model folder (no config.json)." in out


def test_adapter_for_another_base(tmp_path, tiny_base):
    other = make_tiny_llama(tmp_path / "other", hidden_size=96, num_attention_heads=3)
    adapter = make_lora(other, tmp_path / "other-adapter")
    out = start(tmp_path, model(tiny_base, adapter))
    assert f"{adapter / 'adapter_model.safetensors'}: tensor base_model.model.model.layers.0.self_attn.q_proj" in out
    assert "this adapter was made for another base model." in out


def test_truncated_adapter_safetensors(tmp_path, tiny_base, tiny_adapter):
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = start(tmp_path, model(tiny_base, adapter))
    assert f"{weights}: truncated safetensors file" in out


def test_adapter_that_cannot_be_merged(tmp_path, tiny_base, tiny_adapter):
    """Prefix tuning adds to the input, not to a weight: refused at start-up with the reason."""
    from cpuforge.merge.tuners import REFUSED

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    cfg = adapter / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"LORA"', '"PREFIX_TUNING"'))
    out = start(tmp_path, model(tiny_base, adapter))
    assert f"{cfg}: peft_type 'PREFIX_TUNING' cannot be merged: {REFUSED['PREFIX_TUNING']}." in out


def test_quantize_input_that_is_not_a_gguf(tmp_path, llama_bin):
    import subprocess
    import sys

    from helpers import REPO

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.quantize", "--llama-bin", str(llama_bin), "--gguf", str(fake),
         "--out", str(tmp_path / "q.gguf"), "--type", "q4_0"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{fake}: not a GGUF file (starts with b'PK\\x03\\x04', not b'GGUF')." in result.stderr
    assert not (tmp_path / "q.gguf").exists()


def test_adapter_for_another_architecture(tmp_path, tiny_base, tiny_adapter):
    """A GPT-2 style adapter (c_attn) on a Llama base: its modules do not exist there."""
    import numpy as np
    from safetensors.numpy import save_file

    adapter = shutil.copytree(tiny_adapter, tmp_path / "gpt2-adapter")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    weights = adapter / "adapter_model.safetensors"
    save_file(
        {f"{prefix}.lora_A.weight": np.ones((4, 64), np.float32), f"{prefix}.lora_B.weight": np.ones((192, 4), np.float32)},
        weights,
    )
    out = start(tmp_path, model(tiny_base, adapter))
    assert f"{weights}: tensor {prefix}.lora_A.weight adapts transformer.h.0.attn.c_attn.weight, which the base" in out


def with_config(adapter, folder, **change):
    """A copy of `adapter` whose adapter_config.json says `change`."""
    import json

    copy = shutil.copytree(adapter, folder)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(config | change))
    return copy


LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        ({"r": 8}, f"r is 8, but adapter_model.safetensors tensor {LORA_A} has rank 4."),
        ({"rank_pattern": {"q_proj": 16}}, f"rank_pattern['q_proj'] is 16, but adapter_model.safetensors tensor {LORA_A} has rank 4."),
        (
            {"target_modules": ["c_attn", "c_proj"]},
            "target_modules names 'c_attn', which the base {base} does not have (its layers have down_proj, gate_proj, "
            "k_proj, o_proj, q_proj, up_proj, v_proj); this adapter was made for another architecture.",
        ),
        ({"target_modules": r"transformer\.h\.\d+\.attn\.c_attn"}, r"target_modules 'transformer\\.h\\.\\d+\\.attn\\.c_attn' matches no module of the base {base}."),
        ({"layers_to_transform": [0, 31]}, "layers_to_transform names layer 31, but the base {base} has layers 0 to 1."),
        (
            {"layers_to_transform": [0]},
            "target_modules ['q_proj', 'v_proj'] (layers_to_transform [0]) do not select model.layers.1.self_attn.q_proj, "
            "but adapter_model.safetensors tensor base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight adapts it; "
            "peft would drop that tensor.",
        ),
        ({"target_modules": r".*\.(q_proj|v_proj)", "layers_to_transform": [0]},
         "peft refuses this config: `layers_to_transform` cannot be used when `target_modules` is a str."),
        ({"rank_pattern": {"k_proj": 8}}, "rank_pattern key 'k_proj' matches none of the modules this adapter's tensors adapt (q_proj, v_proj)."),
        ({"alpha_pattern": {"q_prj": 16}}, "alpha_pattern key 'q_prj' matches none of the modules this adapter's tensors adapt (q_proj, v_proj)."),
    ],
    ids=["r", "rank_pattern-rank", "target_modules", "target_modules-regex", "layers_to_transform-missing",
         "layers_to_transform-tensors", "regex-with-layers_to_transform", "rank_pattern-key", "alpha_pattern-key"],
)  # fmt: skip
def test_adapter_config_that_disagrees_with_its_tensors_or_the_base(tmp_path, tiny_base, tiny_adapter, change, sentence):
    """Each field peft checks or the merge relies on, against the tensors and the base: one sentence naming it."""
    if "target_modules" not in change:
        change["target_modules"] = ["q_proj", "v_proj"]  # listed in a fixed order, for the sentence
    adapter = with_config(tiny_adapter, tmp_path / "adapter", **change)
    out = start(tmp_path, model(tiny_base, adapter))
    assert f"{adapter / 'adapter_config.json'}: {sentence.format(base=tiny_base)}" in out


def test_gguf_lora_given_as_an_adapter_is_named(tmp_path, tiny_base):
    """A file where an adapter folder belongs: not "not a folder", but what it is and what to give instead."""
    from helpers.models import save_gguf_lora

    gguf = save_gguf_lora(tmp_path / "adapter.gguf")
    out = start(tmp_path, model(tiny_base, gguf))
    assert f"{gguf}: a llama.cpp GGUF adapter (adapter.type lora), which cpuforge cannot merge into a HF base;" in out


def test_two_models_with_one_name(tmp_path, tiny_base, tiny_adapter):
    out = start(tmp_path, model(tiny_base, tiny_adapter) * 2)
    assert "config models: 2 entries share the name 'm'; each model needs its own." in out


def test_tokenizer_the_converter_cannot_read(tmp_path, llama_bin):
    """A BPE tokenizer whose pre-tokenizer the pinned converter does not know stops the run before the merge,
    with the converter's own words in one sentence, not a traceback after it."""
    from helpers.models import unknown_bpe_tokenizer

    tokenizer = unknown_bpe_tokenizer(tmp_path / "tokenizer")
    base = make_tiny_llama(tmp_path / "base", tokenizer=tokenizer, bos_token_id=0, eos_token_id=0)
    adapter = make_lora(base, tmp_path / "adapter")
    config = write_config(tmp_path / "bad.yaml", model(base, adapter))
    result = snakemake(tmp_path, "q4_model", "--configfile", str(config), check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        f"{base}: the pinned llama.cpp converter cannot read this tokenizer: "
        "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
    ) in out
    assert "Traceback" not in out and "rule merge:" not in out
    assert not (tmp_path / "results" / "m" / "merged").exists()
    assert not list((tmp_path / "results").rglob("*.json")) and not list((tmp_path / "results").rglob("*.partial*"))


@pytest.mark.workflow
def test_broken_line_in_the_training_task_file_fails_at_start(tmp_path, tiny_base, tiny_adapter):
    """Read at start-up, not by check_tokenizer after the merge and the conversion."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    models = model(tiny_base, tiny_adapter)
    models[0]["task_data"] = {"train": str(train)}
    out = start(tmp_path, models)
    assert f"{train}: line 2 is not valid JSON (Expecting ',' delimiter at column 15)." in out


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "content", "sentence"),
    [
        ("train.jsonl", b'{"text": "a"}\n\n["a list"]\n', "line 3 is not a JSON object."),
        ("train.jsonl", b'{"messages": [{"role": "user"}]}\n',
         "line 1 has a message 0 without a string `role` and `content`."),
        ("train.jsonl", b'{"system": "s"}\n', "line 1 lacks the text field(s) news (or a `text`, or `messages`)."),
        ("train.txt", b"fine\nnot \xff utf-8\n", "line 2 is not UTF-8 (byte 5 of the line)."),
        ("train.txt", b"\n \n", "holds no rows."),
    ],
)  # fmt: skip
def test_every_line_of_a_task_file_is_read(tmp_path, name, content, sentence):
    from cpuforge.errors import InputError
    from cpuforge.text.task import check_task_data

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        check_task_data({"train": path})
    assert str(e.value) == f"{path}: {sentence}"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_broken_tokenizer_file_is_named_at_start(tmp_path, tiny_base, tiny_adapter, name):
    from cpuforge.errors import InputError
    from cpuforge.merge.plan import check_inputs

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    shutil.copy(tiny_base / name, adapter / name)
    (adapter / name).write_text((adapter / name).read_text()[:-40])
    with pytest.raises(InputError, match=rf"^{adapter / name}: not valid JSON \(.* line \d+ column \d+ .*\)\.$"):
        check_inputs(tiny_base, [adapter])
