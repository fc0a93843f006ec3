"""The speed of adapters applied at run time beside the merged GGUF (bench_runtime_lora): prompt and
generation tokens/s of both, by the same code on the same threads."""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.llama.runtime import apply_loras, load_llama_cpp, load_model

log = logging.getLogger(__name__)


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
