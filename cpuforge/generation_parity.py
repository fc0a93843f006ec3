"""Check that the f16 GGUF answers the held-out prompts as the merged HF model does, greedily.

The GGUF answers through llama-cpp-python's chat path on the pinned libllama
(its own chat template and vocabulary, temperature 0); the merged model through
transformers in float32 (`do_sample=False`). A model without a chat template
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
from cpuforge.prompt import first_difference, gguf_chat_formatter, prompt_ids
from cpuforge.task import answer, exact_match, has_prompts, messages, read_rows

log = logging.getLogger(__name__)


SHOWN = 10


def hf_answers(merged: Path, rows: list[dict], max_new_tokens: int):
    """Greedy answer ids of the merged model in float32, its tokenizer, and its longest prompt in tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    longest = max(len(prompt_ids(tokenizer, r)) for r in rows)
    return greedy_ids(model, tokenizer, rows, max_new_tokens), tokenizer, longest


def gguf_answers(gguf, bin_dir, rows, stop, max_new_tokens, n_ctx, threads) -> tuple[list[list[int]], bool]:
    """Greedy answer ids of the GGUF, and whether they came through its chat template."""
    llama_cpp = load_llama_cpp(bin_dir)
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    return gguf_greedy_ids(llm, rows, stop, max_new_tokens), gguf_chat_formatter(llm) is not None


def check_generation(gguf, merged, heldout, bin_dir, threads, max_new_tokens=48, min_agreement=0.9, limit=0) -> dict:
    """Both models' greedy answers, token for token; raises InputError below `min_agreement`."""
    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    want, tokenizer, longest = hf_answers(merged, rows, max_new_tokens)
    got, chat = gguf_answers(gguf, bin_dir, rows, stop_ids(tokenizer), max_new_tokens, longest + max_new_tokens + 16, threads)
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
