"""Greedy answers to task prompts, from a HF model (transformers) or a GGUF (llama-cpp-python), and the
test of a given answer against a HF folder's greedy choices by teacher forcing (cpuforge.text.stream)."""

from __future__ import annotations

import logging

from cpuforge.text.prompt import prompt_ids
from cpuforge.text.stream import next_token_argmax

log = logging.getLogger(__name__)

FIRST_TOKENS = 8  # of an answer, teacher-forced before the rest: an answer unlike it mostly parts from it there


def stop_ids(tokenizer) -> list[int]:
    """Where an answer ends: the chat template's end of turn, where it has one, and EOS."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return [t for t in (stop, tokenizer.eos_token_id) if t is not None]


def until_stop(ids: list[int], stop) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def greedy_ids(model, tokenizer, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> list[list[int]]:
    """Greedy answers from a HF model as token ids (up to their stop token), batched with left padding."""
    import torch

    out_ids = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = stop_ids(tokenizer)
    for start in range(0, len(rows), batch_size):
        prompts = [prompt_ids(tokenizer, r) for r in rows[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=stop,
            )  # fmt: skip
        out_ids += [until_stop(o[width:].tolist(), stop) for o in out]
        log.info("generated %d/%d answers", len(out_ids), len(rows))
    return out_ids


def greedy_choices(folder, prompts: list[list[int]], answers: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The model's greedy choice after each prompt and after each of its answer's first `max_new_tokens`
    tokens: one streamed pass over every prompt + answer, its layers read once (teacher forcing)."""
    sequences = [p + a[:max_new_tokens] for p, a in zip(prompts, answers, strict=True)]
    return next_token_argmax(folder, sequences, [len(p) - 1 for p in prompts])


def greedy_divergence(choices: list[int], answer: list[int], stop, max_new_tokens: int) -> int | None:
    """Where the greedy answer departs from `answer`, judged from the greedy choices after the prompt and after
    each answer token: the index of its first token that differs, None when greedy decoding writes `answer`.

    Greedy decoding writes token i from the prompt and tokens 0..i-1. While those are `answer`'s own, that
    choice is the teacher-forced one, so the two answers agree up to the first choice that differs from
    `answer`; they are equal when there is none, and greedy decoding then ends where `answer` does: by a
    stop token, or by reaching max_new_tokens."""
    for i, token in enumerate(answer[:max_new_tokens]):
        if choices[i] != token:
            return i
    if len(answer) > max_new_tokens:  # greedy decoding stops writing here; the answer goes on
        return max_new_tokens
    if len(answer) < max_new_tokens and choices[len(answer)] not in stop:
        return len(answer)
    return None


def greedy_known(choices: list[int], answer: list[int], at: int | None, max_new_tokens: int) -> list[int]:
    """The greedy answer as far as teacher forcing on `answer` tells it: `answer` where they agree (`at` is
    None), else its first `at` tokens and the greedy choice after them, if greedy decoding writes one."""
    return answer if at is None else (answer[:at] + choices[at : at + 1])[:max_new_tokens]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy answers from a HF model, batched with left padding."""
    return [decode(tokenizer, ids) for ids in greedy_ids(model, tokenizer, rows, max_new_tokens, batch_size)]


def gguf_stop_ids(llm) -> list[int]:
    """stop_ids() read from the GGUF's own vocabulary."""
    end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    vocab = llm._model
    stop = [end[0]] if len(end) == 1 and vocab.token_get_text(end[0]) == "<|im_end|>" else []
    return stop + ([vocab.token_eos()] if vocab.token_eos() != -1 else [])


def gguf_teacher_forced(llm, prompt: list[int], answer: list[int], max_new_tokens: int) -> list[int]:
    """greedy_choices for one prompt through a GGUF (llama-cpp-python, loaded with logits_all): the choice
    after the prompt and after each of its answer's first `max_new_tokens` tokens, evaluated in a batch where
    greedy decoding runs a pass per token, and only as far as greedy_divergence reads them: the answer's first
    FIRST_TOKENS, then the rest where those agree. The context keeps what it shares with the last sequence
    evaluated (the prompts' common start; the prompt and the shared tokens of another answer to it), so only the
    rest is evaluated."""
    sequence = prompt + answer[:max_new_tokens]
    llm.n_tokens = shared_prefix(llm.input_ids[: llm.n_tokens].tolist(), sequence)  # eval drops the rest
    for end in (min(len(sequence), len(prompt) + FIRST_TOKENS), len(sequence)):
        if llm.n_tokens < end:
            llm.eval(sequence[llm.n_tokens : end])
        choices = llm.scores[len(prompt) - 1 : end].argmax(axis=1).tolist()
        if any(c != t for c, t in zip(choices, answer)):
            break
    return choices


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def gguf_greedy_answers(llm, prompts: list[list[int]], max_new_tokens: int = 48) -> list[str]:
    return [gguf_decode(llm, a) for a in gguf_greedy_ids(llm, prompts, gguf_stop_ids(llm), max_new_tokens)]


def gguf_decode(llm, ids: list[int]) -> str:
    return llm.detokenize(ids).decode("utf-8", errors="replace").strip()


def gguf_greedy_ids(llm, prompts: list[list[int]], stop: list[int], max_new_tokens: int = 48) -> list[list[int]]:
    """Greedy answers from a GGUF through llama-cpp-python (temperature 0, no penalties) to prompts given as
    token ids (cpuforge.text.prompt: transformers' ids, as training saw them), as token ids."""
    out_ids = []
    for i, prompt in enumerate(prompts, 1):
        answer_ids = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop or len(answer_ids) == max_new_tokens:
                break
            answer_ids.append(token)
        out_ids.append(answer_ids)
        # every answer: a 7B writes one in about a minute on two cores
        log.info("generated %d/%d answers (%d tokens)", i, len(prompts), len(answer_ids))
    return out_ids
