"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

Every stage reads the same prompt, as training saw it: the token ids of
transformers' `apply_chat_template` on the merged model's tokenizer
(cpuforge.prompt; plain completion for a model without a chat template). A HF
folder answers them through transformers (do_sample=False), a GGUF file through
llama-cpp-python bound to the pinned libllama, fed those ids as they are (never
the GGUF's template re-tokenized by llama.cpp, which differs for sentencepiece
vocabularies), greedily.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.generate import gguf_greedy_answers, greedy_answers
from cpuforge.llama import load_llama_cpp
from cpuforge.prompt import prompt_ids

log = logging.getLogger(__name__)


def hf_prompts(tokenizer_dir: Path, rows: list[dict]) -> tuple[object, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, [prompt_ids(tokenizer, r) for r in rows]


def answers_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                 threads: int) -> list[str]:  # fmt: skip
    llama_cpp = load_llama_cpp(bin_dir)
    _, hf_ids = hf_prompts(tokenizer_dir, rows)
    n_ctx = max(map(len, hf_ids)) + max_new_tokens
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    log.info("the GGUF answers the %d prompts as transformers' token ids from %s", len(rows), tokenizer_dir)
    return gguf_greedy_answers(llm, hf_ids, max_new_tokens)


def answers_hf(model_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, _ = hf_prompts(tokenizer_dir, rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens)
