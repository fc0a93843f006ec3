"""Adapters as the training tools write them: a vocabulary padded past its tokenizer (LLaMA-Factory), mlx-lm's
LoRA, DoRA and full fine-tunes (merged by mlx-lm's own formula, written independently here), and the formats
cpuforge does not merge (a GGUF LoRA, weights without their config, a full model), each refused in one sentence.
Real peft on the tiny Llama; mlx-lm's files written as mlx_lm.lora writes them (mlx itself does not run here)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers.models import CHAT_SPECIAL_TOKENS, make_lora, make_padded_vocab_adapter, save_gguf_lora, save_mlx_adapter
from safetensors.numpy import load_file

from cpuforge.errors import InputError
from cpuforge.merge.formats import describe
from cpuforge.merge.merge import merge
from cpuforge.merge.plan import check_inputs
from cpuforge.sizing.model import plan_model

# f32 merges against peft's (or the format's formula) in f32: equal up to the order of the operations
TOLERANCE = 1e-5


def merged(folder) -> dict[str, np.ndarray]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_padded_vocabulary_merges_as_peft_does(tmp_path, tiny_base):
    """512 tokens + 3 special ones, embeddings padded to 576 rows (pad_to_multiple_of=64): accepted, merged to peft's
    merge_and_unload, and the merged folder keeps the 576 rows and the 515-token tokenizer."""
    from transformers import AutoTokenizer

    adapter, reference = make_padded_vocab_adapter(tiny_base, tmp_path / "adapter")
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    got = merged(tmp_path / "merged")
    assert set(got) == set(reference) and got["model.embed_tokens.weight"].shape == (576, 64)
    assert max(np.abs(got[k] - reference[k].numpy()).max() for k in reference) < TOLERANCE
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 576
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 515 and tokenizer.convert_tokens_to_ids(CHAT_SPECIAL_TOKENS) == [512, 513, 514]


def test_padded_vocabulary_without_its_tokenizer_is_refused(tmp_path, tiny_base):
    """The base's 512-token tokenizer with the 576 rows: 576 is not 512 padded, so the adapter's tokenizer is
    missing."""
    adapter, _ = make_padded_vocab_adapter(tiny_base, tmp_path / "adapter")
    for f in adapter.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(InputError) as e:
        check_inputs(tiny_base, [adapter])
    assert str(e.value) == (
        f"{tiny_base / 'tokenizer.json'}: tokenizer has 512 tokens but the merged embeddings have 576 rows, which is "
        "neither 512 nor 512 padded to a multiple of a power of two (pad_to_multiple_of); is the adapter's own "
        "tokenizer missing?"
    )


def mlx_reference(base, adapter) -> dict[str, np.ndarray]:
    """mlx-lm's fuse, written from its LoRALinear / DoRALinear: W + scale · (lora_a @ lora_b)ᵀ on each module the
    file holds (then, for DoRA, each row times m over its norm); a full fine-tune's tensors replace the base's."""
    weights, tensors = load_file(base / "model.safetensors"), load_file(adapter / "adapters.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_parameters"]["scale"]
    for name, t in tensors.items():
        if config["fine_tune_type"] == "full":
            weights[name] = t
        elif name.endswith(".lora_a"):
            module = name.removesuffix(".lora_a")
            w = weights[f"{module}.weight"] + (scale * (t @ tensors[f"{module}.lora_b"])).T
            if config["fine_tune_type"] == "dora":
                w = (tensors[f"{module}.m"] / np.linalg.norm(w, axis=1))[:, None] * w
            weights[f"{module}.weight"] = w
    return weights


MLX_CASES = {
    "lora": dict(num_layers=1),
    "lora_keys_all_layers": dict(num_layers=-1, keys=["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]),
    "dora": dict(fine_tune_type="dora", num_layers=2, rank=8, scale=2.0),
    "full": dict(fine_tune_type="full", num_layers=1),
}


@pytest.mark.parametrize("case", sorted(MLX_CASES))
def test_mlx_lm_adapter_merges_by_its_own_formula(tmp_path, tiny_base, case):
    adapter = save_mlx_adapter(tiny_base, tmp_path / "adapters", **MLX_CASES[case])
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    got, want, base = (
        merged(tmp_path / "merged"),
        mlx_reference(tiny_base, adapter),
        load_file(tiny_base / "model.safetensors"),
    )
    assert set(got) == set(want)
    assert max(np.abs(got[k] - want[k]).max() for k in want) < TOLERANCE
    changed = {k for k in base if not np.array_equal(base[k], want[k])}
    layers = {k.split(".")[2] for k in changed}
    assert changed and layers == ({"1"} if MLX_CASES[case]["num_layers"] == 1 else {"0", "1"})
    assert describe(json.loads((adapter / "adapter_config.json").read_text())) == f"mlx-lm {case.split('_')[0]}"
    assert plan_model(check_inputs(tiny_base, [adapter]), "f32").merge_peak > 0  # the sizing reads the same plan


def test_mlx_lm_adapter_on_a_peft_lora(tmp_path, tiny_base):
    """Stacked: a peft LoRA, then an mlx-lm LoRA on what it left."""
    first = make_lora(tiny_base, tmp_path / "peft")
    second = save_mlx_adapter(tiny_base, tmp_path / "mlx", seed=3)
    merge(tiny_base, [first], tmp_path / "step1", "f32")
    shutil.copy(tiny_base / "config.json", tmp_path / "step1" / "config.json")
    merge(tmp_path / "step1", [second], tmp_path / "step2", "f32")
    merge(tiny_base, [first, second], tmp_path / "merged", "f32")
    got, want = merged(tmp_path / "merged"), merged(tmp_path / "step2")
    assert max(np.abs(got[k] - want[k]).max() for k in want) < TOLERANCE


def edit_mlx_config(adapter, **change):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    return path


A = "model.layers.1.self_attn.q_proj.lora_a"


@pytest.mark.parametrize(
    ("made", "change", "sentence"),
    [
        (dict(num_layers=2), dict(num_layers=1),
         "{config}: num_layers 1 and lora_parameters keys ['self_attn.q_proj', 'self_attn.v_proj'] do not select "
         "model.layers.0.self_attn.q_proj, but adapters.safetensors tensor model.layers.0.self_attn.q_proj.lora_a "
         "adapts it; mlx-lm would drop that tensor."),
        (dict(), dict(lora_parameters={"rank": 8, "scale": 10.0, "dropout": 0.0}),
         f"{{config}}: lora_parameters rank is 8, but adapters.safetensors tensors {A} and "
         "model.layers.1.self_attn.q_proj.lora_b have ranks 4 and 4."),
        (dict(fine_tune_type="dora"), dict(fine_tune_type="lora"),
         "{config}: fine_tune_type is 'lora', but adapters.safetensors holds DoRA's magnitude "
         "model.layers.1.self_attn.q_proj.m."),
        (dict(), dict(fine_tune_type="qlora"),
         "{config}: fine_tune_type is 'qlora'; mlx-lm's loader knows only lora, dora, full."),
        (dict(), dict(num_layers=16),
         "{config}: num_layers is 16, but the base has 2 layers; this adapter was made for another base model."),
        (dict(), dict(lora_parameters={"rank": 4}),
         "{config}: lora_parameters has no number 'scale' (it has {{'rank': 4}})."),
        (dict(), dict(lora_parameters={"rank": 4, "scale": 10.0, "use_rslora": True}),
         "{config}: lora_parameters key 'use_rslora' (value True) is none of those mlx-lm's loader reads (rank, scale, "
         "keys, dropout, alpha), so cpuforge cannot tell what it does to the merged weights."),
    ],
    ids=["num_layers", "rank", "dora_tensors", "fine_tune_type", "num_layers_past_the_base", "scale", "unknown_key"],
)  # fmt: skip
def test_mlx_lm_config_that_disagrees_with_its_tensors_or_the_base(tmp_path, tiny_base, made, change, sentence):
    adapter = save_mlx_adapter(tiny_base, tmp_path / "adapters", **made)
    config = edit_mlx_config(adapter, **change)
    with pytest.raises(InputError) as e:
        merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert str(e.value) == sentence.format(config=config)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_mlx_lm_adapter_cannot_run_at_run_time_or_be_verified_by_peft(tmp_path, tiny_base):
    from cpuforge.merge.runtime_lora import check_runtime

    adapter = save_mlx_adapter(tiny_base, tmp_path / "adapters")
    with pytest.raises(InputError) as e:
        check_runtime(tiny_base, [adapter])
    assert str(e.value) == (
        f"{adapter}: cannot run as a GGUF LoRA (lora_adapters): it is an mlx-lm adapter, which the pinned "
        "convert_lora_to_gguf.py does not read; merging it still works."
    )
    with pytest.raises(InputError) as e:
        merge(tiny_base, [adapter], tmp_path / "merged", "f32", ["a prompt"])
    assert str(e.value) == (
        f"{adapter}: merge.verify compares the merge with peft, which cannot load an mlx-lm adapter; turn verify off "
        "for this model."
    )
    assert not (tmp_path / "merged").exists()


def refusal(tiny_base, adapter) -> str:
    with pytest.raises(InputError) as e:
        check_inputs(tiny_base, [adapter])
    return str(e.value)


def test_gguf_lora_is_named_with_what_to_give_instead(tmp_path, tiny_base):
    gguf = save_gguf_lora(tmp_path / "adapter.gguf")
    sentence = (
        f"{gguf}: a llama.cpp GGUF adapter (adapter.type lora), which cpuforge cannot merge into a HF base; give the "
        "peft adapter folder it was converted from (convert_lora_to_gguf.py's input), or apply the file at run time to "
        "the GGUF model (llama-server --lora) or merge it into one with llama.cpp's llama-export-lora."
    )
    assert refusal(tiny_base, gguf) == sentence
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(gguf, folder / "adapter.gguf")
    assert refusal(tiny_base, folder) == sentence.replace(str(gguf), str(folder / "adapter.gguf"))


def test_adapter_weights_without_their_config(tmp_path, tiny_base, tiny_adapter):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_adapter / "adapter_model.safetensors", bare)
    sentence = (
        f"{bare / 'adapter_model.safetensors'}: adapter weights without their adapter_config.json, which peft needs to "
        "merge them (lora_alpha, which scales every delta, is only there); copy the adapter_config.json that "
        f"save_pretrained wrote beside them into {bare}."
    )
    assert refusal(tiny_base, bare) == sentence
    assert refusal(tiny_base, bare / "adapter_model.safetensors") == sentence
    weights = tiny_adapter / "adapter_model.safetensors"
    assert refusal(tiny_base, weights) == f"{weights}: a file of an adapter; give its folder, {tiny_adapter}."
    mlx = save_mlx_adapter(tiny_base, tmp_path / "mlx")
    (mlx / "adapter_config.json").unlink()
    assert refusal(tiny_base, mlx) == (
        f"{mlx / 'adapters.safetensors'}: mlx-lm adapter weights without the adapter_config.json mlx_lm.lora saved "
        f"beside them, which holds their num_layers and lora_parameters (rank, scale); copy that file into {mlx}."
    )
    assert refusal(tiny_base, tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: adapter folder not found."


def test_full_model_given_as_an_adapter(tmp_path, tiny_base):
    assert refusal(tiny_base, tiny_base) == (
        f"{tiny_base}: a full model (config.json and its weights), not an adapter (no adapter_config.json); a fully "
        "fine-tuned model is already merged, so give it as the model's base, not as an adapter."
    )


def test_other_files_and_folders_given_as_an_adapter(tmp_path, tiny_base):
    import gguf

    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(model, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert refusal(tiny_base, model) == f"{model}: a GGUF model (general.type model), not an adapter folder."
    tokenizer = tiny_base / "tokenizer.json"
    assert refusal(tiny_base, tokenizer) == f"{tokenizer}: a file, not an adapter folder."
    (tmp_path / "empty").mkdir()
    assert refusal(tiny_base, tmp_path / "empty") == (
        f"{tmp_path / 'empty'}: no adapter_config.json, so not a peft or mlx-lm adapter folder."
    )


def rewrite_mlx_tensors(adapter, change):
    """adapters.safetensors with `change(tensors)` applied, as another writer would have left it."""
    from safetensors.numpy import save_file

    tensors = load_file(adapter / "adapters.safetensors")
    change(tensors)
    save_file(tensors, adapter / "adapters.safetensors", metadata={"format": "mlx"})


def test_mlx_lm_files_that_cannot_be_merged(tmp_path, tiny_base):
    """Each named in one sentence: mlx-lm's quantized LoRA matrices, a lone lora_a, a magnitude of the wrong
    shape, a full fine-tune's tensor outside its layers, a config without num_layers or without its weights."""
    q, up = "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"
    cases = [
        (dict(), lambda t: t.update({f"{q}.lora_a_scales": np.ones((4, 1), np.float32)}),
         f"{{weights}}: tensor {q}.lora_a_scales is none of mlx-lm's LoRA tensors (lora_a, lora_b, m)."),
        (dict(), lambda t: t.pop(f"{q}.lora_b"), f"{{weights}}: module {q} has no lora_b tensor."),
        (dict(fine_tune_type="dora"), lambda t: t.update({f"{q}.m": np.ones(32, np.float32)}),
         f"{{weights}}: tensor {q}.m has shape [32], not [64]."),
        (dict(fine_tune_type="full"), lambda t: t.update({f"{up}.weight": np.ones((128, 64), np.float32)}),
         f"{{config}}: num_layers 1 trains layers 1 to 1, but adapters.safetensors holds {up}.weight."),
    ]  # fmt: skip
    for i, (made, change, sentence) in enumerate(cases):
        adapter = save_mlx_adapter(tiny_base, tmp_path / str(i), **made)
        rewrite_mlx_tensors(adapter, change)
        weights, config = adapter / "adapters.safetensors", adapter / "adapter_config.json"
        assert refusal(tiny_base, adapter) == sentence.format(weights=weights, config=config)
    adapter = save_mlx_adapter(tiny_base, tmp_path / "no-num_layers")
    config = edit_mlx_config(adapter, num_layers=None)
    assert refusal(tiny_base, adapter) == f"{config}: num_layers is None, not the number of layers mlx-lm adapted."
    (adapter / "adapters.safetensors").unlink()
    edit_mlx_config(adapter, num_layers=1)
    assert refusal(tiny_base, adapter) == f"{adapter}: an mlx-lm adapter_config.json without its adapters.safetensors."
