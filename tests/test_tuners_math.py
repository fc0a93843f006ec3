"""Each tuner's merge against peft's own merge_and_unload, module by module, on a tiny random Llama.

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
from safetensors.torch import load_file

from cpuforge.errors import InputError
from cpuforge.merge.tuners import REFUSED, TUNERS
from cpuforge.merge.tuners.base import REFUSE

ATOL = 1e-5
PREFIX = "base_model.model."
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if bias:  # transformers initialises biases to zero, which would hide a wrong bias merge
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()
    return model


# peft_type → configs to try (each a case), on every linear layer of the tiny Llama
CASES = {
    "IA3": [
        dict(feedforward_modules=["down_proj", "up_proj"]),
    ],
}
BIAS = {"IA3"}  # tuners also tried on a base with biases


def cases():
    for peft_type, configs in CASES.items():
        for i, kwargs in enumerate(configs):
            yield pytest.param(peft_type, kwargs, False, id=f"{peft_type}-{i}")
            if peft_type in BIAS and i == 0:
                yield pytest.param(peft_type, kwargs, True, id=f"{peft_type}-{i}-bias")


def saved_adapter(peft_type: str, kwargs: dict, bias: bool, folder: Path):
    """peft's merge_and_unload of a randomised adapter (the reference), the base's state and the saved adapter."""
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    kwargs = {"target_modules": LINEARS, **kwargs}
    model = tiny_llama(bias)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = peft.get_peft_model(model, config_class(**kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if peft_type == "IA3" else 0.0))
    model.save_pretrained(folder)
    reference = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    return base, reference, config, tensors


def our_merge(peft_type: str, base: dict, config: dict, tensors: dict) -> dict:
    """The merged state as cpuforge computes it from the saved files, module by module."""
    tuner = TUNERS[peft_type]
    shared = {n: tensors[PREFIX.split(".")[0] + "." + n] for n in tuner.shared}
    by_module: dict[str, dict] = {}
    for name, value in tensors.items():
        for suffix in tuner.suffixes:
            if name.endswith("." + suffix) and name.startswith(PREFIX):
                by_module.setdefault(name[len(PREFIX) : -len(suffix) - 1], {})[suffix] = value
    assert by_module, f"no {peft_type} tensors in the adapter file: {sorted(tensors)[:5]}"
    merged = dict(base)
    for module, own in by_module.items():
        merged[module + ".weight"] = tuner.merged_weight(base[module + ".weight"].float(), own, config, module, shared)
        if tuner.merged_bias is not None and module + ".bias" in base:
            merged[module + ".bias"] = tuner.merged_bias(base[module + ".bias"].float(), own, config, module, shared)
    return merged


@pytest.mark.unit
@pytest.mark.parametrize("peft_type,kwargs,bias", cases())
def test_merge_is_peft_merge(peft_type, kwargs, bias, tmp_path):
    base, reference, config, tensors = saved_adapter(peft_type, kwargs, bias, tmp_path)
    TUNERS[peft_type].check_config(tmp_path / "adapter_config.json", config)
    merged = our_merge(peft_type, base, config, tensors)
    assert set(merged) == set(reference)
    worst = max((merged[k].float() - reference[k].float()).abs().max().item() for k in reference)
    print(f"{peft_type} {kwargs} bias={bias}: max |ours - peft| = {worst:.3g}")
    assert worst <= ATOL
    changed = [k for k in reference if not torch.equal(reference[k], base[k])]  # the positive control
    assert len(changed) >= 2 * len(LINEARS), changed


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
            assert tuner.defaults[name] == default, name


@pytest.mark.unit
def test_every_peft_type_is_merged_or_refused():
    from peft.utils.peft_types import PeftType

    assert set(PeftType) - {"LORA"} == set(TUNERS) | set(REFUSED)
    assert not set(TUNERS) & set(REFUSED)


@pytest.mark.unit
def test_unknown_field_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"adapter_config.json: field rank_spice = 3 is not a field of peft's IA3"):
        TUNERS["IA3"].check_config(tmp_path / "adapter_config.json", {"peft_type": "IA3", "rank_spice": 3})
