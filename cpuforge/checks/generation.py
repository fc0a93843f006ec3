"""Check that the f16 GGUF answers the held-out prompts as the merged HF model does, greedily.

Both read the same prompts, as training saw them: the token ids of transformers'
`apply_chat_template` on the merged model's tokenizer (cpuforge.text.prompt). The GGUF
answers first, through llama-cpp-python on the pinned libllama (temperature 0),
and is closed. Then one teacher-forced pass of the merged model in float32,
streamed a decoder layer at a time (cpuforge.text.stream), over every prompt + the
GGUF's answer gives the merged model's greedy choice at each answer position:
its greedy answer is the GGUF's exactly when every choice is the GGUF's token
and, where the GGUF stopped, a stop token (cpuforge.text.generate.greedy_divergence).
So the memory is the GGUF's, then one layer's, never both models, nor the whole
merged model in f32. A model without a chat template answers both ways by plain
completion of the prompt's turns, a line each. The answers must be equal on at
least `--min-agreement` of the prompts; f16 rounding of the weights explains the
rest. Each mismatch is recorded with its first differing token and the merged
model's answer up to that token; the GGUF's answers are scored by exact match
against the task's (the merged model's exact match is eval_task_hf's figure).
"""

from __future__ import annotations

import logging

from cpuforge.errors import InputError
from cpuforge.text.generate import decode, gguf_greedy_ids, greedy_choices, greedy_divergence, greedy_known, stop_ids
from cpuforge.llama.runtime import load_llama_cpp, load_model
from cpuforge.text.prompt import prompt_ids
from cpuforge.text.task import answer, exact_match, has_prompts, messages, read_rows

log = logging.getLogger(__name__)


SHOWN = 10


def gguf_answers(gguf, bin_dir, prompts, stop, max_new_tokens, threads) -> list[list[int]]:
    """Greedy answer ids of the GGUF to prompts given as token ids."""
    llama_cpp = load_llama_cpp(bin_dir)
    n_ctx = max(map(len, prompts)) + max_new_tokens + 16
    llm = load_model(llama_cpp, gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    try:
        return gguf_greedy_ids(llm, prompts, stop, max_new_tokens)
    finally:
        llm.close()  # its memory is given back before the merged model is read


def check_generation(gguf, merged, heldout, bin_dir, threads, max_new_tokens=48, min_agreement=0.9, limit=0) -> dict:
    """The GGUF's greedy answers tested against the merged model's greedy choices; raises InputError below
    `min_agreement`."""
    from transformers import AutoTokenizer

    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [prompt_ids(tokenizer, r) for r in rows]
    stop = stop_ids(tokenizer)
    chat = tokenizer.chat_template is not None
    got = gguf_answers(gguf, bin_dir, prompts, stop, max_new_tokens, threads)
    choices = greedy_choices(merged, prompts, got, max_new_tokens)
    differ = [greedy_divergence(c, a, stop, max_new_tokens) for c, a in zip(choices, got, strict=True)]
    agree = sum(d is None for d in differ)
    rate = agree / len(rows)
    texts = [decode(tokenizer, a) for a in got]
    record = {
        "artifact": gguf.name,
        "reference": f"{merged} (transformers, float32, teacher-forced on the GGUF's answers)",
        "path": "chat template" if chat else "plain completion (no chat template)",
        "prompts": len(rows),
        "agree": agree,
        "rate": rate,
        "min_rate": min_agreement,
        "passed": rate >= min_agreement,
        "max_new_tokens": max_new_tokens,
        "first_difference": differ,
        "exact_match": {"gguf": exact_match(texts, rows)} if all(answer(r) is not None for r in rows) else None,
        "mismatches": [
            # the merged model's answer is known up to its first token that differs from the GGUF's
            {"prompt": messages(r)[-1]["content"], "hf": decode(tokenizer, greedy_known(c, a, d, max_new_tokens)),
             "gguf": t, "token_index": d}
            for r, t, a, c, d in zip(rows, texts, got, choices, differ) if d is not None
        ][:SHOWN],
    }  # fmt: skip
    log.info("greedy answers agree on %d/%d prompts (%.1f %%)", agree, len(rows), 100 * rate)
    if not record["passed"]:
        first = record["mismatches"][0]
        raise InputError(
            f"{gguf}: greedy answers agree with the merged model's on {agree} of {len(rows)} held-out prompts "
            f"({rate:.0%}, below {min_agreement:.0%}); first difference, on {first['prompt']!r}, at answer token "
            f"{first['token_index']}: GGUF {first['gguf']!r}, transformers {first['hf']!r}."
        )
    return record
