"""The prompt path: a conversation rendered with the model's own chat template, as token ids."""

from __future__ import annotations

import logging

from cpuforge.task import messages

log = logging.getLogger(__name__)


# fixed conversations for the chat-template checks: system + user, multi-turn, no system
CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And one more, please?"},
    ],
    "user only": [{"role": "user", "content": "Say hello in French."}],
}


# llama.cpp's fallback when a model has no chat template (llama-server uses it too), so a base
# model answers the same in the chat and through the server
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def gguf_chat_renderer(llm) -> str | None:
    """Which renderer llama-cpp-python's chat path (create_chat_completion, its server) uses for this GGUF:
    "jinja2" for the GGUF's own template, the name of a built-in format when it recognizes the template
    byte for byte (chatml, llama-3, mistral-instruct), None without a template (llama-cpp-python would then
    guess llama-2; cpuforge uses plain completion instead)."""
    from llama_cpp import llama_chat_format

    if llm.metadata.get("tokenizer.chat_template") is None:
        return None
    return llama_chat_format.guess_chat_format_from_gguf_metadata(llm.metadata) or "jinja2"


def gguf_chat_formatter(llm):
    """The formatter of llama-cpp-python's chat path for this GGUF (see gguf_chat_renderer); None when
    the GGUF has no template: then chat must fall back to plain completion, never to a guessed format."""
    from llama_cpp import llama_chat_format

    renderer = gguf_chat_renderer(llm)
    if renderer is None:
        return None
    if renderer != "jinja2":
        return getattr(llama_chat_format, "format_" + renderer.replace("-", "_"))
    vocab = llm._model
    bos, eos = vocab.token_bos(), vocab.token_eos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        bos_token=vocab.token_get_text(bos) if bos != -1 else "",
        eos_token=vocab.token_get_text(eos) if eos != -1 else "",
        stop_token_ids=[eos],
    )


def gguf_chat_prompt(llm, messages: list[dict]) -> tuple[str, list[int]] | None:
    """The prompt text and token ids that llama-cpp-python's chat path builds for `messages` from the
    GGUF's own template and vocabulary (as chat_formatter_to_chat_completion_handler tokenizes it);
    None when the GGUF has no chat template."""
    formatter = gguf_chat_formatter(llm)
    if formatter is None:
        return None
    result = formatter(messages=messages)
    ids = llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
    return result.prompt, ids


def prompt_text(row: dict) -> str:
    """The prompt of a row for a model without a chat template (plain completion): its turns, a line each."""
    return "".join(m["content"] + "\n" for m in messages(row))


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """The prompt's token ids as transformers builds them: the chat template's, else plain completion's."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt_text(row))["input_ids"]
    return tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=True, return_dict=False)


def gguf_prompt_ids(llm, row: dict) -> list[int]:
    """The prompt's token ids as llama-cpp-python builds them from the GGUF: its chat path (the GGUF's
    own template), or plain completion for a GGUF without a template (never a guessed template)."""
    chat = gguf_chat_prompt(llm, messages(row))
    return chat[1] if chat is not None else llm.tokenize(prompt_text(row).encode("utf-8"), add_bos=True, special=True)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
