"""Task data, prose and chat prompts shared by training, the fidelity checks, calibration and evaluation.

A model's task data (config `models[].task_data`; the demo's is data/demo_task)
is a train and a held-out file of samples: JSONL rows in the demo's format
(`system`, `news`, `answer`) or in chat format (`messages`: the conversation,
its last assistant message the answer), or plain text, one sample a line. The
held-out file, when JSONL, is the task the report scores by exact match.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpuforge.errors import InputError


TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "demo_task"


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


def exact_match(answers: list[str], rows: list[dict]) -> float:
    return sum(a == answer(r) for a, r in zip(answers, rows, strict=True)) / len(rows)
