"""Check that a GGUF's chat template builds the prompts transformers builds, to the character.

For a few fixed conversations (system + user, multi-turn, user only; each with the
generation prompt) the prompt that llama-cpp-python's chat path builds from the
GGUF's `tokenizer.chat_template` (what a chat or server on the GGUF sends to the
model; for a template it knows byte for byte, such as ChatML, it uses a built-in
format instead) must equal transformers' `apply_chat_template` on the merged folder,
character for character, and its tokenization must start with exactly one BOS
(none for a model that uses none). A model without a template passes with a
message: chat on it is plain completion, never a guessed template.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.llama import load_gguf_vocab
from cpuforge.prompt import CONVERSATIONS, gguf_chat_prompt, gguf_chat_renderer

log = logging.getLogger(__name__)


def leading(ids: list[int], token: int | None) -> int:
    n = 0
    while token is not None and n < len(ids) and ids[n] == token:
        n += 1
    return n


def excerpt(text: str, at: int) -> str:
    return text[max(0, at - 20) : at + 40]


def expected_bos(tokenizer, rendered: str) -> int:
    """1 when the model starts its sequences with BOS (its tokenizer adds one, or its template writes
    it), else 0."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return 0
    adds = tokenizer("probe")["input_ids"][:1] == [bos] and tokenizer("probe", add_special_tokens=False)["input_ids"][:1] != [bos]
    return int(adds or rendered.startswith(tokenizer.bos_token))


def check_conversation(tokenizer, llm, name: str, conversation: list[dict]) -> dict:
    try:
        hf_text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template may refuse a conversation (e.g. a system role): nothing to compare
        return {"name": name, "skipped": f"transformers' template refuses it: {e}"}
    hf_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    gguf_text, gguf_ids = gguf_chat_prompt(llm, conversation)
    at = next((i for i, (a, b) in enumerate(zip(hf_text, gguf_text)) if a != b), min(len(hf_text), len(gguf_text)))
    same = hf_text == gguf_text
    bos = llm._model.token_bos()
    return {
        "name": name,
        "same_text": same,
        "first_difference": None if same else {"char": at, "hf": excerpt(hf_text, at), "gguf": excerpt(gguf_text, at)},
        "same_ids": hf_ids == gguf_ids,
        "leading_bos": leading(gguf_ids, None if bos == -1 else bos),
        "expected_bos": expected_bos(tokenizer, hf_text),
        "gguf_head": [llm._model.token_get_text(i) for i in gguf_ids[:4]],
        "text": gguf_text,
    }


def check_chat_template(gguf: Path, merged: Path, bin_dir: Path) -> dict:
    """The chat-template record of one GGUF; raises InputError at the first failure."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    llm = load_gguf_vocab(gguf, bin_dir)
    in_gguf = llm.metadata.get("tokenizer.chat_template") is not None
    in_hf = tokenizer.chat_template is not None
    if not in_hf and not in_gguf:
        message = f"{gguf.name} has no chat template (tokenizer.chat_template), nor has {merged}: chat on it is plain completion."
        log.info("%s", message)
        return {"artifact": gguf.name, "template": False, "renderer": None, "passed": True, "message": message,
                "conversations": []}  # fmt: skip
    if in_hf != in_gguf:
        where = "the merged model" if in_hf else "the GGUF"
        raise InputError(f"{gguf}: only {where} has a chat template (merged model: {merged}).")
    renderer = gguf_chat_renderer(llm)
    # llama-cpp-python swaps a template it knows byte for byte for its own built-in format
    path = "its chat template" if renderer == "jinja2" else f"llama-cpp-python's built-in {renderer} format, which replaces its template,"
    results = [check_conversation(tokenizer, llm, name, c) for name, c in CONVERSATIONS.items()]
    for r in results:
        if "skipped" in r:
            log.info("%s: skipped (%s)", r["name"], r["skipped"])
            continue
        log.info("%s: same text %s, same ids %s, leading BOS %d", r["name"], r["same_text"], r["same_ids"], r["leading_bos"])
        if not r["same_text"]:
            d = r["first_difference"]
            raise InputError(
                f"{gguf}: {path} renders the {r['name']} conversation as {d['gguf']!r} where transformers "
                f"renders {d['hf']!r} (first difference at character {d['char']})."
            )
        if r["leading_bos"] != r["expected_bos"]:
            raise InputError(
                f"{gguf}: the chat prompt of the {r['name']} conversation starts with {r['leading_bos']} BOS tokens, "
                f"not {r['expected_bos']}: its tokens begin {r['gguf_head']}."
            )
    record = {"artifact": gguf.name, "template": True, "renderer": renderer, "passed": True, "message": None}
    return record | {"conversations": results}
