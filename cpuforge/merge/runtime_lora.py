"""Adapters applied at run time instead of merged: which adapters can be, the unmerged base they run on,
their GGUF LoRA files, and whether base + runtime LoRA answers as the merged model does.

A GGUF LoRA (the pinned convert_lora_to_gguf.py) holds low-rank pairs and one `lora_alpha`;
llama.cpp adds scale · alpha / r · B @ A at run time, r read from each pair. So an adapter runs
at run time only if all it does is such pairs: no whole tensors (`modules_to_save`, a resized
vocabulary: llama.cpp #11554), no DoRA, no rsLoRA or per-module alphas (alpha / sqrt(r) and
alpha_pattern have no place in the file), no fan_in_fan_out, no LoRA on an lm_head the base
ties to its embeddings (the converter refuses it). Such adapters add up, so a stack applied at
run time, each at its own alpha / r, is the same model as the stack merged in order.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, read_json
from cpuforge.text.generate import gguf_greedy_ids, stop_ids
from cpuforge.llama.runtime import apply_loras, load_llama_cpp, load_model
from cpuforge.merge.plan import EMBED, LM_HEAD, Adapter, Plan, check_inputs
from cpuforge.merge.folders import adapter_shapes
from cpuforge.merge.formats import MLX
from cpuforge.merge.merge import copy_tokenizer
from cpuforge.text.prompt import first_difference, prompt_ids, tokenizer_folder
from cpuforge.io.provenance import copy_gguf_with_provenance
from cpuforge.io.safetensors import safetensors_header
from cpuforge.text.task import has_prompts, messages, read_rows

log = logging.getLogger(__name__)


SHOWN = 10


def refusal(adapter: Adapter, base_rows: int, tied: bool) -> str | None:
    """Why `adapter` cannot run as a GGUF LoRA on its base, or None when it can."""
    config = read_json(adapter.folder / "adapter_config.json")
    if adapter.tuner.startswith(MLX):
        return "is an mlx-lm adapter, which the pinned convert_lora_to_gguf.py does not read"
    if adapter.tuner != "LORA":
        return f"is a {adapter.tuner} adapter, and a GGUF LoRA holds only LoRA's low-rank pairs"
    variant = next((lo for lo in adapter.loras if lo.magnitude or lo.init), None)
    if variant:
        what = "DoRA's magnitude vector" if variant.magnitude else f"the {variant.init} residual base it was trained on"
        return f"needs {what}, which a GGUF LoRA (low-rank pairs added to the base) cannot carry"
    if adapter.biases or adapter.rows:
        return "changes biases (lora_bias) or token rows (trainable_token_indices), which a GGUF LoRA cannot carry"
    shapes = adapter_shapes(adapter.weights)
    for target, name in sorted(adapter.replace.items()):
        if target in (EMBED, LM_HEAD) and shapes[name][0] != base_rows:
            return f"resizes the vocabulary ({name}: {shapes[name][0]} rows, the base has {base_rows})"
        if target in (EMBED, LM_HEAD):
            return f"saves {target} whole ({name}), which a GGUF LoRA cannot carry (llama.cpp #11554)"
        return f"replaces {target} whole ({name}); a GGUF LoRA holds only low-rank pairs"
    if config.get("use_rslora"):
        return "uses rsLoRA (scale alpha / sqrt(r)), but llama.cpp scales a GGUF LoRA by alpha / r"
    if any(v != config.get("lora_alpha", 8) for v in (config.get("alpha_pattern") or {}).values()):
        return "sets per-module alphas (alpha_pattern), but a GGUF LoRA holds one lora_alpha"
    if config.get("fan_in_fan_out"):
        return "is stored fan_in_fan_out (transposed), which the pinned converter does not undo"
    if tied and any(lora.target == LM_HEAD for lora in adapter.loras):
        return "adapts lm_head, which this base ties to its embeddings; the pinned converter refuses that"
    return None


def check_runtime(base: Path, adapters: list[Path]) -> Plan:
    """check_inputs, then every adapter must be able to run at run time; raises InputError naming the first
    that cannot, and why."""
    plan = check_inputs(base, adapters)
    embed_shard = plan.base_files[EMBED]
    base_rows = safetensors_header(embed_shard)[EMBED]["shape"][0]
    tied = LM_HEAD not in plan.base_files
    for adapter in plan.adapters:
        reason = refusal(adapter, base_rows, tied)
        if reason:
            raise InputError(
                f"{adapter.folder}: cannot run as a GGUF LoRA (lora_adapters): it {reason}; merging it still works."
            )
    return plan


def make_unmerged_base(base: Path, adapters: list[Path], out: Path) -> None:
    """The base as a HF folder holding the tokenizer the merged model gets (the last adapter's that has one),
    so the unmerged GGUF reads prompts as the merged one does: the base's weights (linked, not copied), its
    config and generation config, the tokenizer files."""
    plan = check_runtime(base, adapters)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        for shard in sorted(set(plan.base_files.values())):
            (tmp / shard.name).symlink_to(shard.resolve())
        for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        copy_tokenizer(plan.tokenizer, tmp)
    log.info("unmerged base in %s: weights of %s, tokenizer of %s", out, base, plan.tokenizer)


def convert_adapter(
    source: Path, adapter: Path, base: Path, out: Path, outtype: str, threads: int, record: dict
) -> None:
    """The adapter as a GGUF LoRA through the pinned convert_lora_to_gguf.py (`base`: the HF folder whose
    config it reads), with `record` as its provenance, written atomically."""
    pythonpath = os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".converter")
        cmd = [sys.executable, str(source / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base),
               "--outfile", str(scratch), "--outtype", outtype]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        result = subprocess.run(cmd, env=env, stdout=sys.stderr)
        if result.returncode != 0:
            raise InputError(f"{adapter}: the pinned convert_lora_to_gguf.py refused it (exit {result.returncode}).")
        copy_gguf_with_provenance(scratch, tmp, "convert_lora", record)


def check_runtime_lora(
    base: Path, loras: list[Path], merged: Path, heldout: Path, bin_dir: Path, threads: int,
    max_new_tokens: int = 48, min_agreement: float = 0.9, limit: int = 0, gated: bool = True,
) -> dict:  # fmt: skip
    """Greedy answers of `base` with `loras` applied at run time (each at scale 1: its own alpha / r) against
    the merged GGUF's, token for token; with `gated`, raises InputError below `min_agreement`."""
    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    from transformers import AutoTokenizer

    # both sides read the ids transformers gives for the merged model's template, as every runtime does
    folder = tokenizer_folder(merged)
    if folder is None:
        raise InputError(f"{merged}: no merged model folder beside it to build the prompts from.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [prompt_ids(tokenizer, r) for r in rows]
    n_ctx = max(map(len, prompts)) + max_new_tokens + 16  # the longest prompt and its answer
    llama_cpp = load_llama_cpp(bin_dir)
    answers, texts = {}, {}
    for side, path, adapters in (("merged", merged, []), ("runtime", base, loras)):
        llm = load_model(llama_cpp, path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                         verbose=False)  # fmt: skip
        apply_loras(llama_cpp, llm, [(a, 1.0) for a in adapters])
        answers[side] = gguf_greedy_ids(llm, prompts, stop_ids(tokenizer), max_new_tokens)
        texts[side] = [llm.detokenize(a).decode("utf-8", errors="replace").strip() for a in answers[side]]
    agree = [a == b for a, b in zip(answers["merged"], answers["runtime"], strict=True)]
    rate = sum(agree) / len(rows)
    record = {
        "artifact": f"{base.name} + {' + '.join(a.name for a in loras)}",
        "reference": merged.name,
        "prompts": len(rows),
        "agree": sum(agree),
        "rate": rate,
        "min_rate": min_agreement if gated else None,
        "passed": rate >= min_agreement if gated else None,
        "max_new_tokens": max_new_tokens,
        "mismatches": [
            {"prompt": messages(r)[-1]["content"], "merged": m, "runtime": t, "token_index": first_difference(a, b)}
            for r, m, t, a, b, same in zip(rows, texts["merged"], texts["runtime"], answers["merged"],
                                           answers["runtime"], agree) if not same
        ][:SHOWN],
    }  # fmt: skip
    log.info("runtime LoRA and merged model agree on %d/%d prompts (%.1f %%)", sum(agree), len(rows), 100 * rate)
    if gated and not record["passed"]:
        first = record["mismatches"][0]
        raise InputError(
            f"{base} + {', '.join(map(str, loras))}: greedy answers agree with {merged}'s on {sum(agree)} of "
            f"{len(rows)} held-out prompts ({rate:.0%}, below {min_agreement:.0%}); first difference, on "
            f"{first['prompt']!r}: runtime LoRA {first['runtime']!r}, merged {first['merged']!r}."
        )
    return record


def decode_speed(llm, prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
    """Tokens/s as llama-bench's pp and tg tests measure them, through the binding: `prompt_tokens` evaluated
    as one batch, then `gen_tokens` one at a time from a fresh context (no sampling: decode speed alone)."""
    import time

    n_vocab = llm.n_vocab()
    tokens = [(7919 * i) % n_vocab for i in range(1, max(prompt_tokens, gen_tokens) + 1)]  # llama-bench's are random
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens[:prompt_tokens])
    pp = prompt_tokens / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    for token in tokens[:gen_tokens]:
        llm.eval([token])
    tg = gen_tokens / (time.perf_counter() - start)
    return {"pp_tps": pp, "tg_tps": tg}


def speed_side_by_side(
    merged: Path, base: Path, loras: list[Path], bin_dir: Path, threads: int, prompt_tokens: int = 512,
    gen_tokens: int = 128, rounds: int = 3,
) -> dict:  # fmt: skip
    """Prompt and generation tokens/s of the merged GGUF and of `base` with `loras` applied at run time, by the
    same code on the same threads, in turns, each side's best of `rounds` (other work only slows a run down).
    llama-bench cannot load a LoRA, so both go through llama-cpp-python on the pinned libllama."""
    llama_cpp = load_llama_cpp(bin_dir)
    sides = {}
    for side, path, adapters in (("merged", merged, []), ("runtime_lora", base, loras)):
        llm = load_model(llama_cpp, path, n_ctx=max(prompt_tokens, gen_tokens) + 16, n_batch=prompt_tokens,
                         n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)  # fmt: skip
        sides[side] = (llm, apply_loras(llama_cpp, llm, [(a, 1.0) for a in adapters]))
        decode_speed(llm, prompt_tokens, gen_tokens)  # a warm-up, not counted: the first run allocates and pages in
    best = {side: {"pp_tps": 0.0, "tg_tps": 0.0} for side in sides}
    for n in range(rounds):
        for side, (llm, _) in sides.items():
            run = decode_speed(llm, prompt_tokens, gen_tokens)
            best[side] = {k: max(v, run[k]) for k, v in best[side].items()}
            log.info("round %d/%d, %s: pp %.1f t/s, tg %.1f t/s", n + 1, rounds, side, run["pp_tps"], run["tg_tps"])
    return {"runtime": "llama-cpp-python on the pinned libllama (llama-bench cannot load a LoRA)", "threads": threads,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "rounds": rounds, **best}  # fmt: skip
