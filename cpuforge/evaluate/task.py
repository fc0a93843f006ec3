"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

Every stage reads the same prompt, as training saw it: the token ids of
transformers' `apply_chat_template` on the merged model's tokenizer
(cpuforge.text.prompt; plain completion for a model without a chat template). A HF
folder is scored by teacher forcing (answers_hf) in one pass streamed a decoder
layer at a time; a GGUF file answers through llama-cpp-python bound to the
pinned libllama, fed those ids as they are (never the GGUF's template
re-tokenized by llama.cpp, which differs for sentencepiece vocabularies),
greedily (answers_gguf), or is scored by teacher forcing too (right_gguf, the
quant search's check of a candidate).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.text.generate import (
    decode,
    gguf_greedy_answers,
    gguf_greedy_choices,
    gguf_stop_ids,
    greedy_choices,
    greedy_divergence,
    greedy_known,
    stop_ids,
)
from cpuforge.llama.runtime import apply_loras, load_llama_cpp, load_model
from cpuforge.text.prompt import prompt_ids, prompt_text
from cpuforge.text.task import answer, messages

log = logging.getLogger(__name__)


def hf_prompts(tokenizer_dir: Path, rows: list[dict]) -> tuple[object, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, [prompt_ids(tokenizer, r) for r in rows]


def answers_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                 threads: int, loras: list[Path] = ()) -> list[str]:  # fmt: skip
    """Greedy answers of `gguf`, with GGUF LoRA adapters applied at run time if given (each at scale 1)."""
    llama_cpp = load_llama_cpp(bin_dir)
    _, hf_ids = hf_prompts(tokenizer_dir, rows)
    n_ctx = max(map(len, hf_ids)) + max_new_tokens
    llm = load_model(llama_cpp, gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    adapters = apply_loras(llama_cpp, llm, [(lora, 1.0) for lora in loras])  # noqa: F841 (they live with llm)
    log.info("the GGUF answers the %d prompts as transformers' token ids from %s", len(rows), tokenizer_dir)
    return gguf_greedy_answers(llm, hf_ids, max_new_tokens)


def right_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
               threads: int) -> list[bool]:  # fmt: skip
    """Which rows the GGUF's greedy answer gets exactly right, by teacher forcing as answers_hf judges a HF
    folder: each prompt with its task answer's tokens in one batch (a batch per row where answers_gguf runs a
    pass per token), right where the model's choice is the answer's token at every position and a stop token
    after the last (cpuforge.text.generate.greedy_divergence). The quant search's task check: a candidate
    scored at prompt-processing speed. answers_hf's caveat holds (the same text spelled with other tokens counts
    as wrong here); and a batch rounds unlike one-token passes, so a near tie may go the other way than in
    answers_gguf."""
    llama_cpp = load_llama_cpp(bin_dir)
    tokenizer, prompts = hf_prompts(tokenizer_dir, rows)
    golds = [gold_ids(tokenizer, r, p) for r, p in zip(rows, prompts, strict=True)]
    n_ctx = max(len(p) + len(g[:max_new_tokens]) for p, g in zip(prompts, golds, strict=True))
    llm = load_model(llama_cpp, gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False,
                     logits_all=True)  # fmt: skip
    try:
        stop = gguf_stop_ids(llm)
        choices = gguf_greedy_choices(llm, prompts, golds, max_new_tokens)
    finally:
        llm.close()
    return [greedy_divergence(c, g, stop, max_new_tokens) is None for c, g in zip(choices, golds, strict=True)]


def gold_ids(tokenizer, row: dict, prompt: list[int]) -> list[int]:
    """The row's answer as token ids written after `prompt`, as the model saw it in training
    (task.training_texts): the prompt's text and the answer tokenized together, less the prompt. Alone,
    a SentencePiece tokenizer would begin the answer with a word-start piece that it never has there."""
    if tokenizer.chat_template is None:
        text, special = prompt_text(row), True
    else:
        text, special = tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=False), False
    ids = tokenizer(text + answer(row), add_special_tokens=special)["input_ids"]
    if ids[: len(prompt)] != prompt:  # the answer's first token merged with the prompt's last
        log.warning("a prompt and its answer tokenize across their boundary; its answer is tokenized alone")
        return tokenizer(answer(row), add_special_tokens=False)["input_ids"]
    return ids[len(prompt) :]


def answers_hf(model_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int) -> tuple[list[str], list]:
    """Which rows the model's greedy answer gets exactly right, by one teacher-forced pass streamed over every
    prompt + its answer's tokens (cpuforge.text.stream: one decoder layer in f32 in memory, never the model), and
    the answers as far as they are known: the task's where right, else up to the first token that differs.

    Greedy decoding writes each token from the prompt and the tokens before it; while those are the task
    answer's, its choice is the teacher-forced one. So the greedy answer is the task's token for token
    exactly when the model's choice is the answer's token at every answer position and a stop token after
    the last (cpuforge.text.generate.greedy_divergence). One caveat: greedy exact match compares decoded
    text, so a greedy answer that spells the same text with other tokens (other pieces, or a trailing
    space the decoding strips) counts as right there and as wrong here."""
    tokenizer, prompts = hf_prompts(tokenizer_dir, rows)
    golds = [gold_ids(tokenizer, r, p) for r, p in zip(rows, prompts, strict=True)]
    stop = stop_ids(tokenizer)
    choices = greedy_choices(model_dir, prompts, golds, max_new_tokens)
    differ = [greedy_divergence(c, g, stop, max_new_tokens) for c, g in zip(choices, golds, strict=True)]
    answers = [answer(r) if d is None else decode(tokenizer, greedy_known(c, g, d, max_new_tokens))
               for r, g, c, d in zip(rows, golds, choices, differ, strict=True)]  # fmt: skip
    return answers, [d is None for d in differ]
