"""The peft tuners other than LoRA: one module per tuner, each with its config table and its exact merge."""

from __future__ import annotations

from . import (
    adalora,
    beft,
    boft,
    c3a,
    deft,
    delora,
    fourierft,
    glora,
    gralora,
    hira,
    hra,
    ia3,
    ln_tuning,
    loha,
    lokr,
    miss,
    oft,
    peanut,
    pvera,
    randlora,
    road,
    shira,
    supertuning,
    trainable_tokens,
    vblora,
    vera,
)
from .base import Tuner

# peft_type (as adapter_config.json writes it) → the tuner the merge implements exactly
TUNERS: dict[str, Tuner] = {
    t.peft_type: t
    for t in (
        ia3.TUNER,
        loha.TUNER,
        lokr.TUNER,
        adalora.TUNER,
        vera.TUNER,
        fourierft.TUNER,
        hira.TUNER,
        shira.TUNER,
        oft.TUNER,
        hra.TUNER,
        c3a.TUNER,
        delora.TUNER,
        vblora.TUNER,
        randlora.TUNER,
        pvera.TUNER,
        road.TUNER,
        beft.TUNER,
        ln_tuning.TUNER,
        trainable_tokens.TUNER,
        boft.TUNER,
        miss.TUNER,
        supertuning.TUNER,
        glora.TUNER,
        gralora.TUNER,
        peanut.TUNER,
        deft.TUNER,
    )
}

# peft_type → why cpuforge refuses to merge it (the tail of one sentence)
PROMPT = "it adds learned virtual tokens or prefixes to the input, which no weight of the model can hold"
REFUSED: dict[str, str] = {
    "PROMPT_TUNING": PROMPT,
    "MULTITASK_PROMPT_TUNING": PROMPT,
    "P_TUNING": PROMPT,
    "PREFIX_TUNING": PROMPT,
    "CPT": PROMPT,
    "CARTRIDGE": PROMPT,
    "ADAPTION_PROMPT": "it adds gated attention over learned prompts to the attention layers; peft cannot merge it",
    "XLORA": "its mix of LoRA experts depends on each input, so no one merged weight equals it; peft cannot merge it",
    "POLY": "its mix of LoRA skills depends on the task id of each input; peft cannot merge it",
    "LILY": "its router mixes shared experts differently for each input; peft cannot merge it",
    "SHADOW": "a small shadow network beside each layer acts on each input; peft cannot merge it",
    # peft merges these, but cpuforge does not implement their merge yet (each needs more than the saved tensors)
    "WAVEFT": "its delta is an inverse wavelet transform (peft's own waverec2d), which cpuforge does not implement yet",
    "ADAMSS": "its layers are set up from the base weights at load (randomized SVDs, a clustering), not redone yet",
    "FROD": "its shared bases are a joint decomposition of the base's weights across layers, not implemented yet",
    "UNILORA": "each module's parameters are drawn at load from one shared vector by seeded index maps, not redone yet",
    "OSF": "its merge subtracts the low-rank part of an SVD of the base that peft recomputes at load, not redone yet",
    "TINYLORA": "its modules share trained vectors by a grouping peft works out at load, not redone yet",
    "PSOFT": "its merge uses factors of a low-rank SVD of the base that peft recomputes at load, not redone yet",
}
