"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

A HF folder answers through transformers (cpuforge.prompt: the chat template of
the merged model's tokenizer, do_sample=False). A GGUF file answers through
llama-cpp-python bound to the pinned libllama, with the chat template stored in
the GGUF, rendered and tokenized as llama-cpp-python's chat handler does, and
greedy sampling. A model without a chat template is prompted by plain completion
in both. Every stage must see the same prompt: each GGUF prompt's token
ids are checked against transformers' ids before any answer is generated, and a
difference stops the step with the row and the first differing position.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.generate import gguf_greedy_answers, greedy_answers
from cpuforge.llama import load_llama_cpp
from cpuforge.prompt import first_difference, gguf_prompt_ids, prompt_ids

log = logging.getLogger(__name__)


def hf_prompts(tokenizer_dir: Path, rows: list[dict]) -> tuple[object, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, [prompt_ids(tokenizer, r) for r in rows]


def check_same_prompts(gguf: Path, tokenizer_dir: Path, gguf_ids: list[list[int]], hf_ids: list[list[int]]) -> None:
    for number, (ours, theirs) in enumerate(zip(gguf_ids, hf_ids, strict=True), 1):
        if ours != theirs:
            at = first_difference(ours, theirs)
            raise InputError(
                f"{gguf}: held-out row {number} renders through the GGUF's chat template to {len(ours)} tokens that "
                f"differ from the {len(theirs)} of transformers' template of {tokenizer_dir} at token {at}, so the "
                "stages would not see the same prompt."
            )


def answers_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                 threads: int) -> list[str]:  # fmt: skip
    llama_cpp = load_llama_cpp(bin_dir)
    _, hf_ids = hf_prompts(tokenizer_dir, rows)
    n_ctx = max(map(len, hf_ids)) + max_new_tokens
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    check_same_prompts(gguf, tokenizer_dir, [gguf_prompt_ids(llm, r) for r in rows], hf_ids)
    log.info("all %d GGUF prompts equal transformers' token for token", len(rows))
    return gguf_greedy_answers(llm, rows, max_new_tokens)


def answers_hf(model_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, _ = hf_prompts(tokenizer_dir, rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens)
