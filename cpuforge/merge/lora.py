"""LoRA as peft 0.21.2 merges it: what each field of adapter_config.json means for the merged weights, and
the formulas of its variants (DoRA, lora_bias, the initialisations that change the base).

Every field of peft's `LoraConfig` (and of its base `PeftConfig`) is classified below: "exact" (the merge
implements it as peft's merge_and_unload does), "ignored: <why it cannot change the merged weights>", or
"refused" (a value other than peft's default stops the run with one sentence naming the adapter, the field
and the value). A key peft does not know is refused by name too, so that a new option never passes
silently; tests/test_tuners.py fails when the pinned peft has a field this table lacks.
"""

from __future__ import annotations

from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.merge.tuners.base import PEFT_CONFIG_FIELDS

EXACT = "exact"
REFUSED = "refused"

LORA_FIELDS = PEFT_CONFIG_FIELDS | {
    "r": EXACT,  # checked against the tensors' rank
    "target_modules": EXACT,
    "exclude_modules": EXACT,
    "lora_alpha": EXACT,
    "lora_dropout": "ignored: dropout acts in training only; merge_and_unload has none",
    "fan_in_fan_out": "ignored: it describes GPT-2's Conv1D; peft turns it off on nn.Linear, LLaMA's layers",
    "bias": EXACT,  # "all" / "lora_only" save the trained biases whole; written as modules_to_save are
    "use_rslora": EXACT,
    "modules_to_save": EXACT,
    "init_lora_weights": EXACT,  # see INIT below: some values are refused
    "layers_to_transform": EXACT,
    "layers_pattern": EXACT,
    "rank_pattern": EXACT,
    "alpha_pattern": EXACT,
    "megatron_config": REFUSED,
    "megatron_core": "ignored: the module peft imports Megatron's layers from; megatron_config is what decides",
    "trainable_token_indices": EXACT,
    "loftq_config": "ignored: read only by init_lora_weights='loftq', which is refused",
    "eva_config": "ignored: how EVA chose the initial A from activations; the base is untouched and the trained "
    "tensors (and the rank_pattern EVA wrote) are saved",
    "corda_config": "ignored: read only by init_lora_weights='corda', which is refused",
    "lora_ga_config": "ignored: read only by init_lora_weights='lora_ga', which is refused",
    "use_dora": EXACT,
    "velora_config": "ignored: VeLoRA changes only what training keeps for the backward pass (its "
    "lora_velora_embed buffers, skipped); peft merges it as plain LoRA (VeloraLinearVariant.merge_safe)",
    "alora_invocation_tokens": REFUSED,
    "use_qalora": REFUSED,
    "qalora_group_size": "ignored: read only with use_qalora, which is refused",
    "monteclora_config": REFUSED,
    "layer_replication": REFUSED,
    "runtime_config": "ignored: run-time placement (ephemeral_gpu_offload), not weights",
    "lora_bias": EXACT,
    "target_parameters": REFUSED,
    "use_bdlora": REFUSED,
    "arrow_config": REFUSED,
    "kasa_config": REFUSED,
    "ensure_weight_tying": REFUSED,
}

# peft's defaults of the refused fields: any other value is refused
DEFAULTS = {
    "megatron_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# why each refused field cannot be merged: the tail of its sentence
WHY = {
    "megatron_config": "Megatron's parallel layers are not LLaMA's nn.Linear, and cpuforge has no Megatron to "
    "compare with",
    "alora_invocation_tokens": "an activated LoRA acts only after its invocation tokens, so peft cannot merge it "
    "either",
    "use_qalora": "QALoRA pools the input for GPTQ layers, and peft cannot merge it either",
    "monteclora_config": "MonteCLoRA samples its update, so it has no one merged weight",
    "layer_replication": "the adapted model has more layers than the base, which a merge into the base cannot hold",
    "target_parameters": "it adapts raw parameters (MoE experts), which a LLaMA does not have",
    "use_bdlora": "block-diagonal LoRA factors are not implemented in cpuforge's merge",
    "arrow_config": "Arrow routes each token among adapters, so it has no one merged weight",
    "kasa_config": "KaSA truncates the base weight's singular values, which cpuforge's merge does not implement",
    "ensure_weight_tying": "it ties adapters across tied layers, which cpuforge's merge does not implement",
}

# peft 0.2/0.3 (spring 2023) wrote these; peft itself drops them on loading
LEGACY_FIELDS = {
    "enable_lora": "ignored: peft 0.2's switch for GPT-2's fused MergedLinear, None on LLaMA",
    "merge_weights": "ignored: peft 0.2's flag to merge at eval time, not a weight",
}

# init_lora_weights values whose adapter adds to the base as it is: the initialisation only set the adapter's
# starting tensors (or left B or A zero), and the trained tensors are what is saved
INIT_PLAIN = (True, False, "gaussian", "eva", "orthogonal", "mica")
# values that replaced the base by a residual, recomputable from the base alone: a full SVD (PiSSA) and a QR
# (OLoRA) are deterministic functions of the weight
INIT_RESIDUAL = ("pissa", "olora")


def convert_sentence(config_path: Path, value: str) -> str:
    return (
        f"{config_path}: init_lora_weights is {value!r}, so the adapter was saved for the residual base peft made "
        "when it initialised it (the base minus the initial adapter, which depends on more than the base); save it "
        "with peft's save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>) "
        "(LLaMA-Factory: pissa_convert) to turn it into a LoRA of the original base, and give that."
    )


def check_lora_config(config_path: Path, config: dict) -> None:
    """Refuse, by name, every field and value of a LoRA adapter_config.json the merge does not implement."""
    for key, value in config.items():
        if key not in LORA_FIELDS and key not in LEGACY_FIELDS:
            raise InputError(
                f"{config_path}: field {key!r} (value {value!r}) is not one of peft 0.21.2's LoraConfig, so "
                "cpuforge cannot tell what it does to the merged weights."
            )
        if LORA_FIELDS.get(key) == REFUSED and value != DEFAULTS[key] and value not in ([], {}):
            raise InputError(f"{config_path}: {key} is {value!r}; cpuforge will not merge it: {WHY[key]}.")
    init = config.get("init_lora_weights", True)
    if init in INIT_PLAIN or init in INIT_RESIDUAL:
        return
    if isinstance(init, str) and (init.startswith(("pissa_niter_", "corda")) or init in ("loftq", "lora_ga")):
        raise InputError(convert_sentence(config_path, init))
    raise InputError(f"{config_path}: init_lora_weights is {init!r}, which peft 0.21.2 does not know.")


def residual_base(weight, init: str, rank: int, scale: float):
    """The base peft trained a PiSSA or OLoRA adapter against, recomputed from the base weight (f32), exactly as
    peft's pissa_init / olora_init compute it: the weight minus its initial adapter scale · B₀ @ A₀."""
    import torch

    weight = weight.float()
    if init == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        sr = s[:rank] / scale
        a0, b0 = torch.diag(torch.sqrt(sr)) @ uh[:rank], v[:, :rank] @ torch.diag(torch.sqrt(sr))
    else:
        q, r = torch.linalg.qr(weight)
        a0, b0 = r[:rank].contiguous(), q[:, :rank].contiguous()
    return weight - scale * b0 @ a0


def dora_weight(weight, delta, magnitude):
    """DoRA's merged weight: the LoRA-merged weight W + ΔW, each output row rescaled to the trained magnitude m
    (peft's DoraLinearVariant.merge: m / ‖W + ΔW‖ row-wise, the norm taken before the merge)."""
    import torch

    merged = weight.float() + delta
    norm = torch.linalg.norm(merged, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * merged


def describe(config: dict) -> str:
    """The tuner of an adapter_config.json as the provenance and the report name it: the peft_type, and for LoRA
    the variants that change its formula (e.g. "LORA (DoRA, rsLoRA)")."""
    peft_type = str(config.get("peft_type"))
    if peft_type != "LORA":
        return peft_type
    init = config.get("init_lora_weights", True)
    options = {
        "DoRA": config.get("use_dora"),
        "rsLoRA": config.get("use_rslora"),
        "lora_bias": config.get("lora_bias"),
        "trainable tokens": config.get("trainable_token_indices"),
        f"{init} residual": init in INIT_RESIDUAL,
    }
    named = [name for name, on in options.items() if on]
    return f"LORA ({', '.join(named)})" if named else "LORA"
