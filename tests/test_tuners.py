"""Every peft option the merge implements gives, tensor by tensor, what peft's own merge_and_unload gives; every
other is refused with its sentence. Real peft 0.21.2 on tiny random Llamas made here; merges in f32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers.models import make_lora, make_tiny_llama
from helpers.tuners import CASES, NEEDS_BIAS, peft_config
from safetensors.torch import load_file

from cpuforge.errors import InputError
from cpuforge.merge.lora import DEFAULTS, LEGACY_FIELDS, LORA_FIELDS, REFUSED
from cpuforge.merge.merge import merge
from cpuforge.merge.plan import check_inputs
from cpuforge.sizing.model import plan_model

# f32 merges: ours and peft's do the same f32 operations, in an order that may differ by a rounding
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bias_base(tmp_path_factory):
    """A tiny Llama whose attention and MLP layers have biases (attention_bias, mlp_bias): for lora_bias and bias."""
    return make_tiny_llama(tmp_path_factory.mktemp("bias") / "base", seed=1, attention_bias=True, mlp_bias=True)


def trained_adapter(base, out, seed=7, **lora):
    """A peft LoRA adapter on `base` and peft's merge of it (trained, as below)."""
    from peft import LoraConfig

    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], **lora}
    return trained(base, out, LoraConfig(task_type="CAUSAL_LM", **settings), seed)


def trained(base, out, config, seed):
    """The adapter `config` on `base`, its every trainable parameter moved off its initial value as training would
    (B off zero, DoRA's magnitude off the weight norm, trainable tokens off the embeddings), saved in `out`; and the
    reference: peft's merge_and_unload of that same model, as a state dict."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    with torch.no_grad():
        return out, {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def merged_state(folder):
    state = {}
    for f in folder.glob("*.safetensors"):
        state |= load_file(f)
    return state


def refusal(base, adapters, out) -> str:
    """The sentence the merge of `adapters` into `base` stops with."""
    with pytest.raises(InputError) as e:
        merge(base, adapters, out, "f32")
    return str(e.value)


def max_difference(folder, reference) -> float:
    got = merged_state(folder)
    assert set(got) == set(reference), set(got) ^ set(reference)
    assert all(got[k].shape == reference[k].shape for k in reference)
    return max((got[k].float() - reference[k].float()).abs().max().item() for k in reference)


VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
    "dora_rslora_rank_pattern": {"use_dora": True, "use_rslora": True, "rank_pattern": {"up_proj": 8}},
    "trainable_tokens": {"trainable_token_indices": [3, 7, 9]},
    "trainable_tokens_and_lm_head": {"trainable_token_indices": {"embed_tokens": [3, 7], "lm_head": [4, 500]}},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_rslora": {"init_lora_weights": "pissa", "use_rslora": True, "lora_alpha": 4},
    "olora": {"init_lora_weights": "olora"},
    "olora_dora": {"init_lora_weights": "olora", "use_dora": True, "lora_alpha": 16},
    "gaussian": {"init_lora_weights": "gaussian"},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "mica": {"init_lora_weights": "mica"},
    "velora": {"velora_config": {"num_groups": 16}},
}


@pytest.mark.slow  # every variant made and merged by peft, then by us: minutes in all, so not in the fast loop
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variant_merges_as_peft_does(tmp_path, tiny_base, variant):
    adapter, reference = trained_adapter(tiny_base, tmp_path / "adapter", **VARIANTS[variant])
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE
    assert max_difference(tiny_base, reference) > 1e-3  # the adapter does change the model


@pytest.mark.unit
@pytest.mark.parametrize("lora", [{"lora_bias": True}, {"bias": "all"}, {"bias": "lora_only", "use_dora": True}])
def test_biases_merge_as_peft_does(tmp_path, bias_base, lora):
    adapter, reference = trained_adapter(bias_base, tmp_path / "adapter", **lora)
    merge(bias_base, [adapter], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(reference[bias], load_file(bias_base / "model.safetensors")[bias])


def save_model(base, state: dict, out):
    """`state` (a merge_and_unload state dict of `base`) saved as a HF folder, for an adapter stacked on it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_state_dict(state)
    model.save_pretrained(out)


@pytest.mark.unit
def test_stacked_pissa_on_dora(tmp_path, tiny_base):
    """A PiSSA adapter trained on the model a DoRA adapter made: its residual is that merged model's."""
    first, merged_first = trained_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    save_model(tiny_base, merged_first, tmp_path / "step1")
    second, reference = trained_adapter(tmp_path / "step1", tmp_path / "pissa", seed=8, init_lora_weights="pissa")
    merge(tiny_base, [first, second], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE


def edit_config(adapter, **fields):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | fields))
    return adapter / "adapter_config.json"


@pytest.mark.unit
@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga"])
def test_inits_that_left_an_unknowable_residual_are_refused_with_how_to_convert(tmp_path, tiny_base, init):
    adapter = make_lora(tiny_base, tmp_path / "adapter")
    path = edit_config(adapter, init_lora_weights=init)
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == (
        f"{path}: init_lora_weights is {init!r}, so the adapter was saved for the residual base peft made when it "
        "initialised it (the base minus the initial adapter, which depends on more than the base); save it with "
        "peft's save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>) "
        "(LLaMA-Factory: pissa_convert) to turn it into a LoRA of the original base, and give that."
    )
    assert not (tmp_path / "merged").exists()


@pytest.mark.unit
def test_pissa_niter_adapter_as_peft_saves_it_is_refused(tmp_path, tiny_base):
    """LLaMA-Factory's pissa_init without pissa_convert: fast-SVD PiSSA (randomised), saved for its residual."""
    adapter, _ = trained_adapter(tiny_base, tmp_path / "adapter", init_lora_weights="pissa_niter_4")
    with pytest.raises(InputError, match="init_lora_weights is 'pissa_niter_4', so the adapter was saved for"):
        merge(tiny_base, [adapter], tmp_path / "merged", "f32")


@pytest.mark.unit
def test_converted_pissa_merges_into_the_original_base(tmp_path, tiny_base):
    """peft's conversion (path_initial_model_for_weight_conversion) writes init_lora_weights=True and a LoRA of
    twice the rank for the original base: merged as plain LoRA, it gives the fine-tune."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_2")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config)
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with torch.no_grad():
        reference = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    merge(tiny_base, [tmp_path / "converted"], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE


REFUSALS = {
    "alora_invocation_tokens": ([5, 6], "an activated LoRA acts only after its invocation tokens, so peft cannot "
                                "merge it either"),
    "layer_replication": ([[0, 2], [1, 2]], "the adapted model has more layers than the base, which a merge into "
                          "the base cannot hold"),
    "use_qalora": (True, "QALoRA pools the input for GPTQ layers, and peft cannot merge it either"),
    "target_parameters": (["mlp.experts.down_proj"], "it adapts raw parameters (MoE experts), which a LLaMA does not "
                          "have"),
}  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize("field", sorted(REFUSALS))
def test_refused_fields_are_named(tmp_path, tiny_base, tiny_adapter, field):
    import shutil

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    value, why = REFUSALS[field]
    path = edit_config(adapter, **{field: value})
    said = f"{path}: {field} is {value!r}; cpuforge will not merge it: {why}."
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == said


@pytest.mark.unit
def test_unknown_field_is_refused_by_name(tmp_path, tiny_base, tiny_adapter):
    import shutil

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    path = edit_config(adapter, lora_flux=0.5)
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == (
        f"{path}: field 'lora_flux' (value 0.5) is not one of peft 0.21.2's LoraConfig, so cpuforge cannot tell what "
        "it does to the merged weights."
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"target_modules": r".*\.(q_proj|v_proj)", "layers_to_transform": [1]},
         "`layers_to_transform` cannot be used when `target_modules` is a str."),
        ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also be specified."),
    ],
    ids=["regex-with-layers_to_transform", "layers_pattern-alone"],
)  # fmt: skip
def test_a_config_peft_refuses_is_refused_in_its_words(tmp_path, tiny_adapter, tiny_base, fields, said):
    """peft's own LoraConfig validates adapter_config.json: what its __post_init__ refuses (a field peft would
    otherwise have the merge drop silently) stops the run, named with the file."""
    import shutil

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    path = edit_config(adapter, **fields)
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == f"{path}: peft refuses this config: {said}"


@pytest.mark.unit
def test_tuner_tensors_of_a_module_its_config_does_not_select_are_refused(tmp_path, tiny_base):
    """A tuner's target_modules and layers_to_transform must select every module its tensors adapt: peft would
    drop the others' tensors on loading, so a merge of them would not be peft's."""
    adapter, _ = trained_tuner_adapter(tiny_base, tmp_path / "adapter", "LOHA")
    path = edit_config(adapter, target_modules=["q_proj", "v_proj", "up_proj"])
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == (
        f"{path}: target_modules ['q_proj', 'v_proj', 'up_proj'] (layers_to_transform None) do not select "
        "model.layers.0.mlp.down_proj, but adapter_model.safetensors tensor "
        "base_model.model.model.layers.0.mlp.down_proj.hada_w1_a adapts it; peft would drop that tensor."
    )
    edit_config(adapter, target_modules=TARGETS, layers_to_transform=[1])
    with pytest.raises(InputError, match="layers_to_transform \\[1\\]\\) do not select model.layers.0.mlp.down_proj"):
        merge(tiny_base, [adapter], tmp_path / "merged", "f32")


@pytest.mark.unit
def test_lora_bias_on_a_base_without_biases_is_refused_as_peft_refuses(tmp_path, tiny_base, bias_base):
    adapter, _ = trained_adapter(bias_base, tmp_path / "adapter", lora_bias=True)
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == (
        f"{adapter / 'adapter_config.json'}: lora_bias is true, but the base {tiny_base} has no bias "
        "model.layers.0.mlp.up_proj.bias for adapter_model.safetensors tensor "
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.bias; peft refuses this merge too (the base layer has "
        "no bias)."
    )


@pytest.mark.unit
def test_dora_magnitude_without_use_dora_is_refused(tmp_path, tiny_base):
    adapter, _ = trained_adapter(tiny_base, tmp_path / "adapter", use_dora=True)
    path = edit_config(adapter, use_dora=False)
    with pytest.raises(InputError, match="use_dora is false, but adapter_model.safetensors holds DoRA's "):
        merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert path.is_file()


@pytest.mark.unit
def test_every_field_of_peft_lora_config_is_classified():
    """A peft upgrade that adds a LoraConfig field fails here until the merge says what it does with it."""
    import peft

    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert set(fields) - set(LORA_FIELDS) == set(), "LoraConfig fields the merge has not classified"
    assert set(LORA_FIELDS) - set(fields) == set(), "classified fields the pinned peft does not have"
    assert not set(LEGACY_FIELDS) & set(fields)
    for name, kind in LORA_FIELDS.items():
        assert kind in ("exact", REFUSED) or (kind.startswith("ignored: ") and len(kind) > 20), name
        if kind == REFUSED:
            field = fields[name]
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert DEFAULTS[name] == default, name


@pytest.mark.unit
def test_quantized_base_is_named_with_what_to_give_instead(tmp_path, tiny_base, tiny_adapter):
    import shutil

    base = shutil.copytree(tiny_base, tmp_path / "base-bnb-4bit")
    config = json.loads((base / "config.json").read_text())
    quantization = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}))
    assert refusal(base, [tiny_adapter], tmp_path / "merged") == (
        f"{base / 'config.json'}: this base model is quantized (quantization_config: bitsandbytes 4-bit), and "
        "cpuforge merges into 16- or 32-bit weights; give the 16-bit model it was quantized from."
    )


@pytest.mark.unit
def test_qlora_adapter_merges_into_the_16_bit_base(tmp_path, tiny_base):
    """A QLoRA adapter names the quantized repository it was trained on; its 16-bit source is the right base."""
    adapter, reference = trained_adapter(tiny_base, tmp_path / "adapter")
    edit_config(adapter, base_model_name_or_path="unsloth/llama-3-8b-bnb-4bit")
    merge(tiny_base, [adapter], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE


# each tuner other than LoRA goes through the plan and the streamed merge on every case of the tuners' table (the
# module-by-module math of each is tests/test_tuners_math.py's): on attention and MLP layers unless the case names
# others
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def trained_tuner_adapter(base, out, peft_type, seed=11, case=0):
    """As trained_adapter, for a tuner other than LoRA: a case of the tuners' table."""
    return trained(base, out, peft_config(peft_type, case, TARGETS), seed)


def implemented_tuners():
    from cpuforge.merge.tuners import TUNERS

    return sorted(TUNERS)


# the fast loop checks every case's math (test_tuners_math); this adds the plan, the streamed writer and the sizing
# on two real bases, every case made and merged by peft, then by us: too long for the fast loop
@pytest.mark.slow
@pytest.mark.parametrize("peft_type", implemented_tuners())
def test_tuner_merges_as_peft_does(tmp_path, tiny_base, bias_base, peft_type):
    """Through the plan and the streamed merge, on a base without biases and on one with them."""
    bases = (bias_base,) if peft_type in NEEDS_BIAS else (tiny_base, bias_base)
    cases = [(base, case) for case in range(len(CASES[peft_type])) for base in bases]
    for base, case in cases:
        folder = tmp_path / f"{base.parent.name}-{case}"
        adapter, reference = trained_tuner_adapter(base, folder / "adapter", peft_type, case=case)
        merge(base, [adapter], folder / "merged", "f32")
        assert max_difference(folder / "merged", reference) < TOLERANCE, (base, case)
        # the adapter changes the model by more than the tolerance (COFT's by little), so doing nothing would fail
        assert max_difference(base, reference) > 2 * TOLERANCE
        # the sizing reads the same plan: every tuner's working set has a figure (biases, norms, shared tensors)
        m = plan_model(check_inputs(base, [adapter]), "f32")
        assert m.merge_peak >= max(t.nbytes for t in m.base.values()), (base, case)


@pytest.mark.unit
def test_lora_then_a_tuner_on_top(tmp_path, tiny_base):
    first, merged_first = trained_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    save_model(tiny_base, merged_first, tmp_path / "step1")
    second, reference = trained_tuner_adapter(tmp_path / "step1", tmp_path / "second", implemented_tuners()[0])
    merge(tiny_base, [first, second], tmp_path / "merged", "f32")
    assert max_difference(tmp_path / "merged", reference) < TOLERANCE


@pytest.mark.unit
def test_prompt_tuning_is_refused_with_its_reason(tmp_path, tiny_base, tiny_adapter):
    import shutil

    from cpuforge.merge.tuners import REFUSED as REFUSED_TUNERS

    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    path = edit_config(adapter, peft_type="PREFIX_TUNING")
    said = f"{path}: peft_type 'PREFIX_TUNING' cannot be merged: {REFUSED_TUNERS['PREFIX_TUNING']}."
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == said


@pytest.mark.unit
def test_provenance_and_report_name_the_tuners(tmp_path, tiny_base):
    import subprocess
    import sys

    from helpers import REPO

    from cpuforge.evaluate.records import read_provenance
    from cpuforge.evaluate.report import provenance_html

    first, _ = trained_adapter(tiny_base, tmp_path / "dora", use_dora=True, use_rslora=True)
    second, _ = trained_tuner_adapter(tiny_base, tmp_path / "second", implemented_tuners()[0])
    out = tmp_path / "merged"
    subprocess.run(
        [sys.executable, "-m", "scripts.merge", "--base", str(tiny_base), "--adapter", str(first), "--adapter",
         str(second), "--out", str(out), "--dtype", "f32"], cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    tuners = ["LORA (DoRA, rsLoRA)", implemented_tuners()[0]]
    assert read_provenance(out)["tuners"] == tuners
    page = provenance_html([{"label": "merged (HF)", "path": str(out), "provenance": read_provenance(out)}])
    assert f"<code>{out}</code> (adapters: {', '.join(tuners)})</summary>" in page


@pytest.mark.unit
@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"use_dora": True}, "needs DoRA's magnitude vector, which a GGUF LoRA (low-rank pairs added to the base) "
         "cannot carry"),
        ({"init_lora_weights": "olora"}, "needs the olora residual base it was trained on, which a GGUF LoRA "
         "(low-rank pairs added to the base) cannot carry"),
        ({"trainable_token_indices": [3]}, "changes biases (lora_bias) or token rows (trainable_token_indices), "
         "which a GGUF LoRA cannot carry"),
    ],
)  # fmt: skip
def test_runtime_gguf_adapters_stay_lora_only(tmp_path, tiny_base, lora, reason):
    """Merged exactly, but not run as GGUF LoRAs: said once, with the reason, by the runtime check."""
    from cpuforge.merge.runtime_lora import check_runtime

    adapter, _ = trained_adapter(tiny_base, tmp_path / "adapter", **lora)
    with pytest.raises(InputError) as e:
        check_runtime(tiny_base, [adapter])
    assert str(e.value) == f"{adapter}: cannot run as a GGUF LoRA (lora_adapters): it {reason}; merging it still works."


@pytest.mark.unit
def test_runtime_gguf_adapters_refuse_other_tuners(tmp_path, tiny_base):
    from cpuforge.merge.runtime_lora import check_runtime

    peft_type = implemented_tuners()[0]
    adapter, _ = trained_tuner_adapter(tiny_base, tmp_path / "adapter", peft_type)
    with pytest.raises(InputError, match=f"it is a {peft_type} adapter, and a GGUF LoRA holds only LoRA's low-rank"):
        check_runtime(tiny_base, [adapter])


@pytest.mark.unit
def test_tuner_adapter_for_another_base_is_named_from_headers(tmp_path, tiny_base):
    """The tuner's merge tried on shapes alone (meta tensors): no weight is read, no merged folder begun."""
    other = make_tiny_llama(tmp_path / "other", hidden_size=96, num_attention_heads=3)
    adapter, _ = trained_tuner_adapter(other, tmp_path / "adapter", "LOHA")
    message = refusal(tiny_base, [adapter], tmp_path / "merged")
    assert message.startswith(f"{adapter / 'adapter_model.safetensors'}: ")
    assert "model.layers.0.mlp.down_proj" in message
    assert message.endswith("this adapter was made for another base model.")
    assert not (tmp_path / "merged.partial").exists()


@pytest.mark.unit
def test_trainable_tokens_on_a_tied_base_stay_tied(tmp_path):
    """peft's TrainableTokens changes the tied lm_head with the embeddings: the merged folder stays tied."""
    base = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    adapter, reference = trained_adapter(base, tmp_path / "adapter", trainable_token_indices=[3, 7, 9])
    merge(base, [adapter], tmp_path / "merged", "f32")
    got = merged_state(tmp_path / "merged")
    assert "lm_head.weight" not in got
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])
    assert max((got[k] - reference[k]).abs().max().item() for k in got) < TOLERANCE


# every tuner's merge writes the base's tensors, names and shapes (max_difference holds each against peft's), through
# the same writer: so the converter sees one folder layout, and a GGUF of each kind of change is enough (a variant of
# LoRA, a recomputed residual base, changed embedding rows, a rotation of the weights)
GGUF_CASES = ["dora", "pissa", "trainable_tokens", "OFT"]


@pytest.mark.llama
@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_of_the_merged_folder_loads_and_answers(tmp_path, tiny_base, llama_bin, case):
    """The pinned converter takes the merged folder of each tuner and variant, and llama.cpp runs the GGUF."""
    from helpers.llama import convert, ids_answers
    from gguf import GGUFReader

    if case in VARIANTS:
        adapter, _ = trained_adapter(tiny_base, tmp_path / "adapter", **VARIANTS[case])
    else:
        adapter, _ = trained_tuner_adapter(tiny_base, tmp_path / "adapter", case)
    merge(tiny_base, [adapter], tmp_path / "merged", "f16")
    gguf = convert(tmp_path / "merged", tmp_path / "merged.gguf")
    assert len(GGUFReader(gguf).tensors) == 21
    assert len(ids_answers(gguf, [[1, 5, 77, 300, 12]], max_tokens=4, errors="replace")) == 1


@pytest.mark.unit
def test_beft_into_a_base_without_biases_is_refused_as_peft_refuses(tmp_path, tiny_base, bias_base):
    adapter, _ = trained_tuner_adapter(bias_base, tmp_path / "adapter", "BEFT")
    assert refusal(tiny_base, [adapter], tmp_path / "merged") == (
        f"{adapter / 'adapter_model.safetensors'}: the BEFT tensors of model.layers.0.mlp.down_proj change its bias, "
        "but the base has no model.layers.0.mlp.down_proj.bias; peft refuses this merge too."
    )
