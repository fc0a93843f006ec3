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
    "IA3": [dict(feedforward_modules=["down_proj", "up_proj"])],
    "LOHA": [
        dict(r=4, alpha=6),
        dict(r=4, alpha=6, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 3}, alpha_pattern={"v_proj": 11}),
    ],
    "LOKR": [
        dict(r=4, alpha=6),  # r small: w2 as a low-rank product
        dict(r=16, alpha=3, decompose_both=True, decompose_factor=8),  # w1 whole, w2 whole
        dict(r=2, alpha=3, decompose_both=True, rank_pattern={"o_proj": 1}, alpha_pattern={"k_proj": 5}),
    ],
    "ADALORA": [
        dict(init_r=6, lora_alpha=12, total_step=10),
        # r and use_rslora are not read by AdaLoRA: the case shows the merge may ignore them
        dict(init_r=6, lora_alpha=-1, total_step=10, r=3, use_rslora=True),
    ],
    "VERA": [dict(r=16), dict(r=8, save_projection=False, projection_prng_key=7)],
    "FOURIERFT": [dict(n_frequency=200, scaling=30.0, random_loc_seed=5, n_frequency_pattern={"down_proj": 300})],
    "HIRA": [dict(r=4, rank_pattern={"q_proj": 2})],
    "SHIRA": [dict(r=2, random_seed=3)],
    "OFT": [
        dict(oft_block_size=16),
        dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False),
        dict(oft_block_size=8, coft=True, eps=1e-3, num_cayley_neumann_terms=7),
    ],
    "HRA": [dict(r=4), dict(r=6, apply_GS=True)],
    "C3A": [dict(block_size=16, block_size_pattern={"down_proj": 32})],
    "DELORA": [dict(r=4, delora_lambda=3, rank_pattern={"q_proj": 2})],
    "VBLORA": [
        dict(r=4, num_vectors=40, vector_length=32, topk=3),
        dict(r=2, num_vectors=300, vector_length=16, topk=2, save_only_topk_weights=True),
    ],
    "PVERA": [dict(r=8, sample_at_inference=True)],
    "ROAD": [dict(group_size=16), dict(variant="road_2", group_size=32), dict(variant="road_4", group_size=8)],
    "BOFT": [
        dict(boft_block_size=8),
        dict(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2),
        dict(boft_block_size=4, boft_n_butterfly_factor=3),
    ],
    "MISS": [dict(r=16), dict(r=48), dict(r=8, init_weights="bat"), dict(r=16, mini_r=4, init_weights="mini")],
    "SUPERTUNING": [dict(sparsity=0.9), dict(sparsity=0.95, select_top=False, r=4, lora_alpha=8)],
    "GLORA": [
        dict(r=4),
        dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
        dict(r=2, config_A_B="constant", config_C="none", config_D_E="none"),
    ],
    "GRALORA": [dict(r=8, alpha=12), dict(r=8, gralora_k=4, hybrid_r=2, alpha=5)],
    "PEANUT": [dict(r=8), dict(r=4, depth=2, act_fn="gelu", scaling=0.3)],
    "DEFT": [dict(r=4), dict(r=4, decomposition_method="qr", alpha=8), dict(r=2, para=True)],
    "BEFT": [dict()],
    "LN_TUNING": [dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])],
    "TRAINABLE_TOKENS": [dict(token_indices=[1, 5, 7, 90])],
    "RANDLORA": [dict(r=8, randlora_alpha=20), dict(r=24, randlora_alpha=5, sparse=True, projection_prng_key=3)],
}
BIAS = set(
    CASES
)  # every tuner is also tried on a base with biases: a merge must keep them, or change them as peft does


NEEDS_BIAS = {"BEFT"}  # peft refuses to merge it into a layer without a bias
OWN_TARGETS = {"LN_TUNING", "TRAINABLE_TOKENS"}  # tuners of other layers than the linears


def cases():
    for peft_type, configs in CASES.items():
        for i, kwargs in enumerate(configs):
            if peft_type not in NEEDS_BIAS:
                yield pytest.param(peft_type, kwargs, False, id=f"{peft_type}-{i}")
            if peft_type in BIAS and i == 0:
                yield pytest.param(peft_type, kwargs, True, id=f"{peft_type}-{i}-bias")


def saved_adapter(peft_type: str, kwargs: dict, bias: bool, folder: Path):
    """The base's state, peft's merge_and_unload of a randomised adapter saved and loaded again as a user would
    (the reference), the adapter's config and its tensors."""
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    kwargs = {"target_modules": LINEARS, **kwargs} if peft_type not in OWN_TARGETS else kwargs
    model = tiny_llama(bias)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = peft.get_peft_model(model, config_class(**kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if peft_type == "IA3" else 0.0))
    if peft_type == "ADALORA":  # as AdaLoRA's budget would leave it: some ranks pruned, one module to rank 0
        model.peft_config["default"].rank_pattern = {
            f"model.layers.{i}.{m}.lora_E.default": [j % (2 + i) != 1 or m == "self_attn.q_proj" for j in range(6)]
            for i in range(2)
            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
        }
        model.peft_config["default"].rank_pattern["model.layers.1.mlp.down_proj.lora_E.default"] = [False] * 6
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


@pytest.mark.slow  # every variant made and merged by peft, then by us: minutes in all, so not in the fast loop
@pytest.mark.parametrize("peft_type,kwargs,bias", list(cases()))
def test_merge_is_peft_merge(peft_type, kwargs, bias, tmp_path):
    base, reference, config, tensors = saved_adapter(peft_type, kwargs, bias, tmp_path)
    TUNERS[peft_type].check_config(tmp_path / "adapter_config.json", config)
    merged, by_module = our_merge(peft_type, base, config, tensors)
    assert set(merged) == set(reference)
    worst = max((merged[k].float() - reference[k].float()).abs().max().item() for k in reference)
    print(f"{peft_type} {kwargs} bias={bias}: max |ours - peft| = {worst:.3g}")
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
