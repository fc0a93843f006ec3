"""The configs every tuner other than LoRA is tried on, one table for both of its tests: tests/test_tuners_math.py
(each tuner's math against peft's merge_and_unload, module by module) and tests/test_tuners.py (through the plan
and the streamed merge). Each case is a peft config's arguments beside its target_modules, which each test sets
unless the case does; the cases of a tuner cover the options that change its math or the tensors it saves. The
shapes they need fit both tests' tiny Llamas (hidden 32 or 64: block sizes and vector lengths up to 32)."""

from __future__ import annotations

# peft_type → configs to try (each a case)
CASES = {
    "IA3": [dict(feedforward_modules=["down_proj", "up_proj"])],
    "LOHA": [
        dict(r=4, alpha=6),
        dict(r=4, alpha=6, rank_pattern={"q_proj": 2, "layers.0.mlp.down_proj": 3}, alpha_pattern={"v_proj": 11}),
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
    # r=24 divides no layer's width: the last block is partial
    "MISS": [dict(r=16), dict(r=24), dict(r=8, init_weights="bat"), dict(r=16, mini_r=4, init_weights="mini")],
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
    # tuners of other layers than the linears name their own
    "LN_TUNING": [dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])],
    "TRAINABLE_TOKENS": [dict(target_modules=["embed_tokens"], token_indices=[1, 5, 7, 90])],
    "RANDLORA": [dict(r=8, randlora_alpha=20), dict(r=24, randlora_alpha=5, sparse=True, projection_prng_key=3)],
}
NEEDS_BIAS = {"BEFT"}  # peft refuses to merge it into a layer without a bias


def peft_config(peft_type: str, case: int, targets: list[str]):
    """peft's config object of one case, on `targets` unless the case names its own."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert peft_type in CASES, f"{peft_type}: the merge implements it, but tests/helpers/tuners.py has no config for it"
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**{"target_modules": targets, **CASES[peft_type][case]})
