"""Check that the f16 GGUF answers the held-out prompts as the merged HF model does, greedily.

Both read the same prompts, as training saw them: the token ids of transformers'
`apply_chat_template` on the merged model's tokenizer (cpuforge.prompt). The GGUF
answers them through llama-cpp-python on the pinned libllama (temperature 0); the
merged model through transformers in float32 (`do_sample=False`). A model without a chat template
answers both ways by plain completion of the prompt's turns, a line each. The answers, compared token for
token, must be equal on at least `--min-agreement` of the prompts; f16 rounding
of the weights explains the rest. Both are decoded by the merged model's
tokenizer for the record, with their exact match against the task's answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.generate import decode, gguf_greedy_ids, greedy_ids, stop_ids
from cpuforge.llama import load_llama_cpp
from cpuforge.prompt import first_difference, prompt_ids
from cpuforge.task import answer, exact_match, has_prompts, messages, read_rows

log = logging.getLogger(__name__)


SHOWN = 10


def hf_answers(merged: Path, rows: list[dict], max_new_tokens: int):
    """Greedy answer ids of the merged model in float32, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    return greedy_ids(model, tokenizer, rows, max_new_tokens), tokenizer


def gguf_answers(gguf, bin_dir, prompts, stop, max_new_tokens, threads) -> list[list[int]]:
    """Greedy answer ids of the GGUF to prompts given as token ids."""
    llama_cpp = load_llama_cpp(bin_dir)
    n_ctx = max(map(len, prompts)) + max_new_tokens + 16
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    return gguf_greedy_ids(llm, prompts, stop, max_new_tokens)


def check_generation(gguf, merged, heldout, bin_dir, threads, max_new_tokens=48, min_agreement=0.9, limit=0) -> dict:
    """Both models' greedy answers, token for token; raises InputError below `min_agreement`."""
    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    want, tokenizer = hf_answers(merged, rows, max_new_tokens)
    chat = tokenizer.chat_template is not None
    prompts = [prompt_ids(tokenizer, r) for r in rows]
    got = gguf_answers(gguf, bin_dir, prompts, stop_ids(tokenizer), max_new_tokens, threads)
    agree = [a == b for a, b in zip(want, got, strict=True)]
    rate = sum(agree) / len(rows)
    texts = {"hf": [decode(tokenizer, a) for a in want], "gguf": [decode(tokenizer, a) for a in got]}
    scored = all(answer(r) is not None for r in rows)
    record = {
        "artifact": gguf.name,
        "reference": f"{merged} (transformers, float32)",
        "path": "chat template" if chat else "plain completion (no chat template)",
        "prompts": len(rows),
        "agree": sum(agree),
        "rate": rate,
        "min_rate": min_agreement,
        "passed": rate >= min_agreement,
        "max_new_tokens": max_new_tokens,
        "exact_match": {side: exact_match(t, rows) for side, t in texts.items()} if scored else None,
        "mismatches": [
            {"prompt": messages(r)[-1]["content"], "hf": h, "gguf": g, "token_index": first_difference(a, b)}
            for r, h, g, a, b, same in zip(rows, texts["hf"], texts["gguf"], want, got, agree) if not same
        ][:SHOWN],
    }  # fmt: skip
    log.info("greedy answers agree on %d/%d prompts (%.1f %%)", sum(agree), len(rows), 100 * rate)
    if not record["passed"]:
        first = record["mismatches"][0]
        raise InputError(
            f"{gguf}: greedy answers agree with the merged model's on {sum(agree)} of {len(rows)} held-out prompts "
            f"({rate:.0%}, below {min_agreement:.0%}); first difference, on {first['prompt']!r}: GGUF {first['gguf']!r}, "
            f"transformers {first['hf']!r}."
        )
    return record
