"""Task data, prose and chat prompts shared by training, the fidelity checks, calibration and evaluation.

A model's task data (config `models[].task_data`; the demo's is data/demo_task)
is a train and a held-out file of samples: JSONL rows in the demo's format
(`system`, `news`, `answer`) or in chat format (`messages`: the conversation,
its last assistant message the answer), or plain text, one sample a line. The
held-out file, when JSONL, is the task the report scores by exact match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from scripts.common import InputError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_task"
FIELDS = ("system", "news", "answer")


def read_heldout(path: str | Path) -> list[dict]:
    """The held-out rows the report scores: JSON objects, each a prompt with its answer (the demo's
    `system`, `news` and `answer`, or `messages` ending in the assistant's answer)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path}: holds no rows.")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {number} is not a JSON object.")
        if "messages" not in row:
            missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
            if missing:
                raise InputError(f"{path}: line {number} lacks the text field(s) {', '.join(missing)}.")
        elif not isinstance(answer(row), str):
            raise InputError(f"{path}: line {number}: its `messages` do not end in the assistant's answer.")
        rows.append(row)
    return rows


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


def load_split(name: str, task_dir: Path = TASK_DIR) -> list[dict]:
    return read_rows(task_dir / f"{name}.jsonl")


def read_rows(path: str | Path) -> list[dict]:
    """The samples of a task data file: JSONL rows as they are, a text file's non-empty lines as {"text": …}."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def as_text(rows: list[dict]) -> str:
    """Rows as plain text for the perplexity text: each conversation without its system prompt, then its answer."""
    turns = ([m["content"] for m in messages(r) if m["role"] != "system"] + [answer(r)] for r in rows)
    return "\n\n".join("\n".join(t) for t in turns)


def messages(row: dict) -> list[dict]:
    """The prompt of a row as chat messages: the conversation up to (not including) its answer."""
    if "messages" in row:
        turns = row["messages"]
        return turns[:-1] if turns and turns[-1]["role"] == "assistant" else turns
    return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["news"]}]


def answer(row: dict) -> str | None:
    if "messages" in row:
        turns = row["messages"]
        return turns[-1]["content"] if turns and turns[-1]["role"] == "assistant" else None
    return row.get("answer")


def has_prompts(rows: list[dict]) -> bool:
    return bool(rows) and all("messages" in r or {"system", "news"} <= r.keys() for r in rows)


def row_texts(row: dict) -> list[str]:
    """Every string a model reads or writes in a row, one sample each."""
    if "text" in row:
        return [row["text"]]
    return [m["content"] for m in messages(row)] + ([answer(row)] if answer(row) is not None else [])


def task_texts(paths: list[str | Path]) -> list[str]:
    return [text for path in paths for row in read_rows(path) for text in row_texts(row)]


def prompt_text(row: dict) -> str:
    """The prompt of a row for a model without a chat template (plain completion): its turns, a line each."""
    return "".join(m["content"] + "\n" for m in messages(row))


def prompt_ids(tokenizer, row: dict) -> list[int]:
    """The prompt's token ids as transformers builds them: the chat template's, else plain completion's."""
    if tokenizer.chat_template is None:
        return tokenizer(prompt_text(row))["input_ids"]
    return tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=True, return_dict=False)


def training_texts(tokenizer, paths: list[str | Path]) -> list[str]:
    """Each row as the model saw it in training: the rendered prompt and its answer, ending the turn
    where the template has an end-of-turn token; plain text rows as they are."""
    texts = []
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else (tokenizer.eos_token or "")
    for path in paths:
        for row in read_rows(path):
            if "text" in row or tokenizer.chat_template is None:
                texts.append("\n".join(row_texts(row)))
                continue
            prompt = tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=False)
            texts.append(prompt + (answer(row) or "") + end)
    return texts


def prose(part: str = "all") -> str:
    """Real prose nobody in this project wrote and that ships offline: the text of Python's own
    documentation topics (pydoc_data). The first half is for evaluation (perplexity, parity), the
    second half for calibration (importance matrix), so a calibrated quant is never scored on the
    text it was calibrated on."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    cut = text.index("\n", len(text) // 2)
    return {"all": text, "evaluation": text[:cut], "calibration": text[cut + 1 :]}[part]


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


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


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy answers from a HF model, batched with left padding."""
    return [decode(tokenizer, ids) for ids in greedy_ids(model, tokenizer, rows, max_new_tokens, batch_size)]


def gguf_prompt_ids(llm, row: dict) -> list[int]:
    """The prompt's token ids as llama-cpp-python builds them from the GGUF: its chat path (the GGUF's
    own template), or plain completion for a GGUF without a template (never a guessed template)."""
    from scripts.common import gguf_chat_prompt

    chat = gguf_chat_prompt(llm, messages(row))
    return chat[1] if chat is not None else llm.tokenize(prompt_text(row).encode("utf-8"), add_bos=True, special=True)


def gguf_stop_ids(llm) -> list[int]:
    """stop_ids() read from the GGUF's own vocabulary."""
    end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    vocab = llm._model
    stop = [end[0]] if len(end) == 1 and vocab.token_get_text(end[0]) == "<|im_end|>" else []
    return stop + ([vocab.token_eos()] if vocab.token_eos() != -1 else [])


def gguf_greedy_answers(llm, rows: list[dict], max_new_tokens: int = 48) -> list[str]:
    ids = gguf_greedy_ids(llm, rows, gguf_stop_ids(llm), max_new_tokens)
    return [llm.detokenize(a).decode("utf-8", errors="replace").strip() for a in ids]


def gguf_greedy_ids(llm, rows: list[dict], stop: list[int], max_new_tokens: int = 48) -> list[list[int]]:
    """Greedy answers from a GGUF through llama-cpp-python (temperature 0, no penalties), as token ids."""
    out_ids = []
    for i, row in enumerate(rows, 1):
        answer_ids = []
        for token in llm.generate(gguf_prompt_ids(llm, row), temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop or len(answer_ids) == max_new_tokens:
                break
            answer_ids.append(token)
        out_ids.append(answer_ids)
        if i % 10 == 0 or i == len(rows):
            log.info("generated %d/%d answers", i, len(rows))
    return out_ids


def exact_match(answers: list[str], rows: list[dict]) -> float:
    return sum(a == answer(r) for a, r in zip(answers, rows, strict=True)) / len(rows)
