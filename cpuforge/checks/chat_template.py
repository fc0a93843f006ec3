"""Check that the chat and the server on a GGUF feed the model the token ids transformers gives.

For fixed conversations (system + user, multi-turn with the assistant's history,
user only, system + multi-turn; each with the generation prompt) and the task's
held-out prompts, the ids each runtime really evaluates are compared with
transformers' `apply_chat_template(..., tokenize=True)` on the merged folder:

- chat: the prompt of scripts.chat's GGUF path (cpuforge.text.prompt.gguf_runtime_prompt,
  as GGUFChat builds it for this file);
- server: the ids scripts.serve's proxy sends llama-server's /completion for the
  request (cpuforge.serve.completions.completion_request).

"passed" means both gave exactly transformers' ids for every prompt; a difference
fails the step with the runtime, the prompt and the first differing token. Also
recorded, not required: llama.cpp's own path, the GGUF's template tokenized by
llama.cpp (what the runtimes fall back to without a merged folder, and what
llama-server's own chat endpoint evaluates), which differs on sentencepiece
vocabularies. Metadata and tokenizers only: the GGUF is loaded vocab-only. A model
without a template passes with a message: chat on it is plain completion, never
a guessed template.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jinja2 import TemplateError

from cpuforge.serve.completions import completion_request
from cpuforge.errors import InputError
from cpuforge.llama.runtime import load_gguf_vocab
from cpuforge.paths import merged_folder
from cpuforge.text.prompt import CONVERSATIONS, ChatPrompt, GGUFPrompt, chat_prompt_for, first_difference, hf_chat_ids
from cpuforge.text.task import has_prompts, messages, read_rows

log = logging.getLogger(__name__)


# the fixed conversations, and one that has every part: a system prompt, the assistant's history, a second turn
CHECKED = CONVERSATIONS | {
    "system+multi-turn": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "bank"},
        {"role": "assistant", "content": "merger"},
        {"role": "user", "content": "report"},
    ]
}
GATED = ("chat", "server")


class ServerPath:
    """The ids the proxy sends llama-server for a chat request (its own path when it has no ChatPrompt)."""

    def __init__(self, prompt: ChatPrompt | None, fallback: GGUFPrompt):
        self.prompt, self.fallback = prompt, fallback

    def ids(self, conversation: list[dict]) -> list[int]:
        if self.prompt is None:
            return self.fallback.ids(conversation)
        return completion_request({"messages": conversation}, self.prompt)["prompt"]

    def describe(self) -> str:
        if self.prompt is None:
            return "llama-server's own chat template path (" + self.fallback.describe() + ")"
        return "token ids sent to llama-server's /completion: " + self.prompt.describe()


def runtime_ids(path, conversation: list[dict]) -> list[int] | str:
    try:
        return path.ids(conversation)
    except (TemplateError, InputError, TypeError, KeyError) as e:
        return f"refused: {e}"


def check_prompts(tokenizer, paths: dict, prompts: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """Per runtime: how many prompts got exactly transformers' ids, and the first that did not; per prompt
    of the fixed conversations: which runtimes agreed."""
    runtimes = {name: {"path": path.describe(), "same_ids": 0, "first_mismatch": None} for name, path in paths.items()}
    details = []
    n = 0
    for name, conversation in prompts.items():
        try:
            want = hf_chat_ids(tokenizer, conversation)
        except Exception as e:  # a template may refuse a conversation (e.g. a system role): nothing to compare
            if name in CHECKED:
                details.append({"name": name, "skipped": f"transformers' template refuses it: {e}"})
            continue
        n += 1
        same = {}
        for runtime, path in paths.items():
            got = runtime_ids(path, conversation)
            same[runtime] = got == want
            record = runtimes[runtime]
            record["same_ids"] += same[runtime]
            if not same[runtime] and record["first_mismatch"] is None:
                at = first_difference(got, want) if isinstance(got, list) else 0
                record["first_mismatch"] = {
                    "prompt": name, "token": at, "tokens": len(got) if isinstance(got, list) else None,
                    "hf_tokens": len(want), "hf": tokenizer.convert_ids_to_tokens(want[max(0, at - 2) : at + 4]),
                    "runtime": tokenizer.convert_ids_to_tokens(got[max(0, at - 2) : at + 4]) if isinstance(got, list) else got,
                }  # fmt: skip
        if name in CHECKED:
            details.append({"name": name, "hf_tokens": len(want), "same_ids": same,
                            "hf_head": tokenizer.convert_ids_to_tokens(want[:6])})  # fmt: skip
    for record in runtimes.values():
        record["prompts"] = n
    return runtimes, details


def check_chat_template(gguf: Path, merged: Path, bin_dir: Path, heldout: Path | None = None) -> dict:
    """The chat-template record of one GGUF; raises InputError when the chat or the server is fed other ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    llm = load_gguf_vocab(gguf, bin_dir)
    in_gguf = llm.metadata.get("tokenizer.chat_template") is not None
    in_hf = tokenizer.chat_template is not None
    if not in_hf and not in_gguf:
        message = f"{gguf.name} has no chat template (tokenizer.chat_template), nor has {merged}: chat on it is plain completion."
        log.info("%s", message)
        return {"artifact": gguf.name, "template": False, "passed": True, "message": message, "runtimes": {},
                "conversations": []}  # fmt: skip
    if in_hf != in_gguf:
        where = "the merged model" if in_hf else "the GGUF"
        raise InputError(f"{gguf}: only {where} has a chat template (merged model: {merged}).")
    # what a runtime started on this file uses: the merged folder beside it, else the one given here (--tokenizer)
    beside = merged_folder(gguf)
    folder = None if beside is not None and (beside / "tokenizer.json").is_file() else merged
    own = GGUFPrompt(llm)
    chat = chat_prompt_for(gguf, folder)
    paths = {"chat": chat or own, "server": ServerPath(chat, own), "llama.cpp": own}
    prompts = dict(CHECKED)
    rows = read_rows(heldout) if heldout is not None else []
    if has_prompts(rows):
        prompts |= {f"held-out row {i}": messages(r) for i, r in enumerate(rows, 1)}
    runtimes, details = check_prompts(tokenizer, paths, prompts)
    for name, record in runtimes.items():
        record["gated"] = name in GATED
        log.info("%s: %d/%d prompts fed exactly transformers' ids (%s)", name, record["same_ids"], record["prompts"],
                 record["path"])  # fmt: skip
    for name in GATED:
        miss = runtimes[name]["first_mismatch"]
        if miss is not None:
            raise InputError(
                f"{gguf}: the {name} feeds the {miss['prompt']} prompt as {miss['runtime']} where transformers' "
                f"template of {merged} gives {miss['hf']} (token {miss['token']}; {runtimes[name]['path']})."
            )
    record = {"artifact": gguf.name, "template": True, "tokenizer": str(chat.folder if chat else merged),
              "passed": True, "message": None}  # fmt: skip
    return record | {"runtimes": runtimes, "conversations": details}
