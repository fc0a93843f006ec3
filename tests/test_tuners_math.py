"""Each tuner's merge against peft's own merge_and_unload, module by module, on a tiny random Llama (one layer of
width 32: every case of every tuner in seconds, so the fast loop checks them all).

peft initialises many adapter tensors to an identity or to zero, so every trainable tensor is set to random
values first: a merge that did nothing would then fail the positive control. Tolerance: f32 arithmetic in a
different order than peft's, atol 1e-5 on weights of size ~0.02..1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from helpers.tuners import CASES, NEEDS_BIAS, peft_config
from safetensors.torch import load_file

from cpuforge.errors import InputError
from cpuforge.merge.tuners import REFUSED, TUNERS
from cpuforge.merge.tuners.base import REFUSE

ATOL = 1e-5
PREFIX = "base_model.model."
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def one_thread():
    """On matrices this small torch's threads cost more than they give (twice the time on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if bias:  # transformers initialises biases to zero, which would hide a wrong bias merge
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()
    return model


OWN_TARGETS = {t for t, configs in CASES.items() if "target_modules" in configs[0]}  # tuners of other layers


def cases():
    """Every case of every tuner. The first also runs on a base with biases, which a merge must keep or change as peft
    does; where the tuner leaves biases alone, on that base only (the weights' math is the same on both)."""
    for peft_type, configs in CASES.items():
        changes_bias = TUNERS[peft_type].merged_bias is not None and peft_type not in NEEDS_BIAS
        for i in range(len(configs)):
            if i > 0 or changes_bias:
                yield pytest.param(peft_type, i, False, id=f"{peft_type}-{i}")
            if i == 0:
                yield pytest.param(peft_type, i, True, id=f"{peft_type}-{i}-bias")


def saved_adapter(peft_type: str, case: int, bias: bool, folder: Path):
    """The base's state, peft's merge_and_unload of a randomised adapter saved and loaded again as a user would
    (the reference), the adapter's config and its tensors."""
    model = tiny_llama(bias)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = peft.get_peft_model(model, peft_config(peft_type, case, LINEARS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if peft_type == "IA3" else 0.0))
    if peft_type == "ADALORA":  # as AdaLoRA's budget would leave it: some ranks pruned, one module to rank 0
        model.peft_config["default"].rank_pattern = {
            f"model.layers.0.{m}.lora_E.default": [j % 2 != 1 or m == "self_attn.q_proj" for j in range(6)]
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
        }
        model.peft_config["default"].rank_pattern["model.layers.0.mlp.down_proj.lora_E.default"] = [False] * 6
    model.save_pretrained(folder)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(bias), folder)
    reference = {k: v.clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    return base, reference, config, tensors


def our_merge(peft_type: str, base: dict, config: dict, tensors: dict) -> tuple[dict, dict]:
    """The merged state as cpuforge computes it from the saved files, module by module, and each module's tensors."""
    tuner = TUNERS[peft_type]
    by_module: dict[str, dict] = {}
    for name, value in tensors.items():
        for suffix in tuner.suffixes:
            if name.endswith("." + suffix) and name.startswith(PREFIX):
                by_module.setdefault(name[len(PREFIX) : -len(suffix) - 1], {})[suffix] = value
    assert by_module, f"no {peft_type} tensors in the adapter file: {sorted(tensors)[:5]}"
    shared = {n: tensors["base_model." + n] for n in tuner.shared if "base_model." + n in tensors}
    if tuner.shared and not shared:
        shared = tuner.make_shared(config, [tuple(base[m + ".weight"].shape) for m in by_module])
    merged = dict(base)
    for module, own in by_module.items():
        merged[module + ".weight"] = tuner.merged_weight(base[module + ".weight"].float(), own, config, module, shared)
        if tuner.merged_bias is not None and module + ".bias" in base:
            weight = base[module + ".weight"].float()
            bias = base[module + ".bias"].float()
            merged[module + ".bias"] = tuner.merged_bias(bias, own, config, module, shared, weight)
    return merged, by_module


@pytest.mark.parametrize("peft_type,case,bias", list(cases()))
def test_merge_is_peft_merge(peft_type, case, bias, tmp_path):
    base, reference, saved, tensors = saved_adapter(peft_type, case, bias, tmp_path)
    TUNERS[peft_type].check_config(tmp_path / "adapter_config.json", saved)
    merged, by_module = our_merge(peft_type, base, saved, tensors)
    assert set(merged) == set(reference)
    worst = max((merged[k].float() - reference[k].float()).abs().max().item() for k in reference)
    print(f"{peft_type} {CASES[peft_type][case]} bias={bias}: max |ours - peft| = {worst:.3g}")
    assert worst <= ATOL
    # the positive control: every adapted module changes (its bias, for BEFT), but where AdaLoRA pruned it to rank 0
    key = ".bias" if peft_type in NEEDS_BIAS else ".weight"
    kept = [m for m, own in by_module.items() if all(t.numel() for t in own.values())]
    assert len(kept) >= 2 * (peft_type not in OWN_TARGETS), kept
    for module in kept:
        assert not torch.equal(reference[module + key], base[module + key]), f"{module} is not changed by the merge"


@pytest.mark.unit
@pytest.mark.parametrize("peft_type", sorted(TUNERS))
def test_every_config_field_is_classified(peft_type):
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    tuner = TUNERS[peft_type]
    names = {f.name for f in dataclasses.fields(config_class)}
    assert names - set(tuner.fields) == set(), "fields of peft's config that the tuner does not classify"
    assert set(tuner.fields) - names == set(), "fields the tuner classifies that peft's config does not have"
    for name, kind in tuner.fields.items():
        assert kind == "exact" or kind == REFUSE or kind.startswith("ignored: "), (name, kind)
        if kind == REFUSE:
            f = next(f for f in dataclasses.fields(config_class) if f.name == name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert tuner.accepts(name)[0] == default, name


@pytest.mark.unit
def test_every_peft_type_is_merged_or_refused():
    from peft.utils.peft_types import PeftType

    assert set(PeftType) - {"LORA"} == set(TUNERS) | set(REFUSED)
    assert not set(TUNERS) & set(REFUSED)


@pytest.mark.unit
def test_unknown_field_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"adapter_config.json: field rank_spice = 3 is not a field of peft's IA3"):
        TUNERS["IA3"].check_config(tmp_path / "adapter_config.json", {"peft_type": "IA3", "rank_spice": 3})


@pytest.mark.unit
def test_refused_field_is_named(tmp_path):
    config = {"peft_type": "VERA", "bias": "all", "r": 16}
    sentence = r"adapter_config.json: bias = 'all' changes the merge .* VERA, which merges only bias = 'none'\.$"
    with pytest.raises(InputError, match=sentence):
        TUNERS["VERA"].check_config(tmp_path / "adapter_config.json", config)
