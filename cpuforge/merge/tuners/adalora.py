"""AdaLoRA: an SVD-shaped LoRA, B @ (A * E), scaled by lora_alpha over the initial rank, pruned by rank_pattern."""

from __future__ import annotations

import torch

from .base import DROPOUT, FAN_IN_FAN_OUT_LINEAR, REFUSE, Tuner, usual_fields

SCHEDULE = "ignored: the rank budget schedule of training; its outcome is in rank_pattern and the saved tensors"
NOT_READ = "ignored: AdaLoRA's layers never read it (peft's AdaLoraLayer.update_layer and get_delta_weight)"

FIELDS = {
    **usual_fields(lacks="init_weights"),
    "r": "ignored: AdaLoRA starts at init_r and peft warns that r is not used",
    "init_r": "exact",
    "lora_alpha": "exact",
    # the saved tensors are already cut to the kept ranks; the pattern only says which were kept
    "rank_pattern": "exact",
    "lora_dropout": DROPOUT,
    "fan_in_fan_out": FAN_IN_FAN_OUT_LINEAR,
    "use_rslora": NOT_READ,
    "alpha_pattern": NOT_READ,
    "runtime_config": "ignored: where the adapter runs (GPU offload), not what it computes; peft does not save it",
    "megatron_core": "ignored: names the package megatron_config would use, and megatron_config is refused",
    "qalora_group_size": "ignored: used only with use_qalora, which is refused",
    **{k: SCHEDULE for k in "target_r tinit tfinal deltaT beta1 beta2 orth_reg_weight total_step".split()},
}
ACCEPTED = {
    # a string (pissa, olora, …) is truthy to AdaLoRA, which then starts as with True; refused to be safe
    "init_lora_weights": (True, False),
    "loftq_config": ({}, None),
    "use_dora": (False,),
    "use_qalora": (False,),
    "lora_bias": (False,),
    "ensure_weight_tying": (False,),
    **{
        k: (None,)
        for k in (
            "megatron_config trainable_token_indices eva_config corda_config lora_ga_config velora_config "
            "alora_invocation_tokens monteclora_config layer_replication target_parameters use_bdlora arrow_config "
            "kasa_config"
        ).split()
    },
}
FIELDS.update({k: REFUSE for k in ACCEPTED if k != "init_lora_weights"})
FIELDS["init_lora_weights"] = REFUSE


def merged_weight(weight: torch.Tensor, tensors: dict, config: dict, module: str, shared: dict) -> torch.Tensor:
    """peft's SVDLinear.get_delta_weight: B @ (A * E) * scaling / (ranknum + 1e-5).

    ranknum is the initial rank init_r for every module: peft never saves it, and on load it keeps init_r even
    where rank_pattern cut the module's rank. scaling is lora_alpha, or the module's rank when lora_alpha <= 0."""
    a, b, e = (tensors[k].float() for k in ("lora_A", "lora_B", "lora_E"))
    alpha = config.get("lora_alpha", 8)
    scaling = alpha if alpha > 0 else float(a.shape[0])
    ranknum = torch.tensor(float(config.get("init_r", 12)))
    return weight + (b @ (a * e)) * scaling / (ranknum + 1e-5)


TUNER = Tuner("ADALORA", FIELDS, ("lora_A", "lora_B", "lora_E"), merged_weight, accepted=ACCEPTED)
