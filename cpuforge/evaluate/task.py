"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

Every stage reads the same prompt, as training saw it: the token ids of
transformers' `apply_chat_template` on the merged model's tokenizer
(cpuforge.text.prompt; plain completion for a model without a chat template). A HF
folder is scored by teacher forcing (answers_hf) in one pass streamed a decoder
layer at a time; a GGUF file answers through llama-cpp-python bound to the
pinned libllama, fed those ids as they are (never the GGUF's template
re-tokenized by llama.cpp, which differs for sentencepiece vocabularies),
greedily (answers_gguf), or is checked by teacher forcing too against a reference's
answers, the f16 GGUF's as eval_task wrote them (fidelity_gguf, the quant search's check of a candidate).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cpuforge.text.generate import (
    decode,
    gguf_decode,
    gguf_greedy_ids,
    gguf_stop_ids,
    gguf_teacher_forced,
    greedy_choices,
    greedy_divergence,
    greedy_known,
    stop_ids,
)
from cpuforge.errors import InputError
from cpuforge.io.files import read_json
from cpuforge.llama.runtime import apply_loras, load_llama_cpp, load_model
from cpuforge.text.prompt import prompt_ids, prompt_text
from cpuforge.text.task import answer, messages

log = logging.getLogger(__name__)


def hf_prompts(tokenizer_dir: Path, rows: list[dict]) -> tuple[object, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, [prompt_ids(tokenizer, r) for r in rows]


def answers_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                 threads: int, loras: list[Path] = ()) -> tuple[list[str], list[list[int]]]:  # fmt: skip
    """Greedy answers of `gguf`, as text and as token ids, with GGUF LoRA adapters applied at run time if given
    (each at scale 1)."""
    llama_cpp = load_llama_cpp(bin_dir)
    _, hf_ids = hf_prompts(tokenizer_dir, rows)
    n_ctx = max(map(len, hf_ids)) + max_new_tokens
    llm = load_model(llama_cpp, gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    adapters = apply_loras(llama_cpp, llm, [(lora, 1.0) for lora in loras])  # noqa: F841 (they live with llm)
    log.info("the GGUF answers the %d prompts as transformers' token ids from %s", len(rows), tokenizer_dir)
    ids = gguf_greedy_ids(llm, hf_ids, gguf_stop_ids(llm), max_new_tokens)
    return [gguf_decode(llm, a) for a in ids], ids


def read_answers(path: Path, rows: int | None = None) -> dict:
    """A GGUF's answers as eval_task wrote them (`path`): their token ids and which are right; `rows`, the
    held-out rows they must answer."""
    record = read_json(path)
    if "answer_ids" not in record:
        raise InputError(f"{path}: its answers are not kept as token ids (written by an older cpuforge); delete it "
                         "and eval_task writes it again.")  # fmt: skip
    if rows is not None and len(record["answer_ids"]) != rows:
        raise InputError(f"{path}: answers to {len(record['answer_ids'])} rows where the task has {rows} held-out "
                         "rows; delete it and eval_task writes it again.")  # fmt: skip
    return {"answers": record["answer_ids"], "right": record["right"]}


@contextmanager
def teacher_forced(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                   threads: int) -> Iterator[tuple]:  # fmt: skip
    """The GGUF loaded to score answers by teacher forcing (logits_all), the rows' prompt ids, their task
    answers' ids and the vocabulary's stop tokens, for as long as the block lasts."""
    llama_cpp = load_llama_cpp(bin_dir)
    tokenizer, prompts = hf_prompts(tokenizer_dir, rows)
    golds = [gold_ids(tokenizer, r, p) for r, p in zip(rows, prompts, strict=True)]
    n_ctx = max(len(p) for p in prompts) + max_new_tokens + 1
    llm = load_model(llama_cpp, gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False,
                     logits_all=True)  # fmt: skip
    try:
        yield llm, prompts, golds, gguf_stop_ids(llm)
    finally:
        llm.close()


def fidelity_gguf(gguf: Path, bin_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                  threads: int, reference: dict) -> dict:  # fmt: skip
    """Per row, whether the GGUF's greedy answer equals the reference's and whether it is right, by teacher
    forcing (gguf_teacher_forced): on the reference's answer, and where the two differ on the task's answer
    too, from the first token where it leaves the reference's. `reference`: the f16 GGUF's answers as token ids
    and which are right (eval_task's `answer_ids` and `right`)."""
    agree, right = [], list(reference["right"])
    with teacher_forced(gguf, bin_dir, tokenizer_dir, rows, max_new_tokens, threads) as (llm, prompts, golds, stop):
        for i, (prompt, mine, gold) in enumerate(zip(prompts, reference["answers"], golds, strict=True)):
            choices = gguf_teacher_forced(llm, prompt, mine, max_new_tokens)
            agree.append(greedy_divergence(choices, mine, stop, max_new_tokens) is None)
            if not agree[-1]:
                choices = gguf_teacher_forced(llm, prompt, gold, max_new_tokens)
                right[i] = greedy_divergence(choices, gold, stop, max_new_tokens) is None
            if (i + 1) % 10 == 0 or i + 1 == len(rows):
                log.info("teacher-forced %d/%d answers (%d unlike the reference's)", i + 1, len(rows),
                         agree.count(False))  # fmt: skip
    return {"agree": agree, "right": right}


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
