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
    rows = read_rows(path)
    for number, row in rows_with_lines(path, rows):
        if "messages" not in row:
            missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
            if missing:
                raise InputError(f"{path}: line {number} lacks the text field(s) {', '.join(missing)}.")
        elif not isinstance(answer(row), str):
            raise InputError(f"{path}: line {number}: its `messages` do not end in the assistant's answer.")
    return rows


def check_task_data(files: dict[str, str | Path]) -> None:
    """Read every line of a model's task files at start-up, so a bad one stops the run before any rule, with
    the file and the line named: the held-out JSONL as the report scores it, every other file as its samples."""
    for split, path in files.items():
        if split == "heldout" and str(path).endswith(".jsonl"):
            read_heldout(path)
        else:
            read_rows(path)


def rows_with_lines(path: Path, rows: list[dict]):
    """Each row with its line number in `path` (blank lines are skipped in `rows`)."""
    numbers = [n for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    return zip(numbers, rows, strict=True)


def load_split(name: str, task_dir: Path = TASK_DIR) -> list[dict]:
    return read_rows(task_dir / f"{name}.jsonl")


def read_rows(path: str | Path) -> list[dict]:
    """The samples of a task data file: JSONL rows as they are, a text file's non-empty lines as {"text": …}.
    Every line is checked: UTF-8, and in JSONL a JSON object with a sample in one of the formats the module
    docstring names; a bad one is named by its file and line."""
    path = Path(path)
    rows = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: line {number} is not UTF-8 (byte {e.start + 1} of the line).") from None
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            rows.append({"text": line.rstrip("\r")})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {number} is not a JSON object.")
        if problem := sample_problem(row):
            raise InputError(f"{path}: line {number} {problem}.")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: holds no rows.")
    return rows


def sample_problem(row: dict) -> str | None:
    """What keeps a JSONL row from being a sample: a `text`, a `messages` conversation, or `system` and `news`."""
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            return "has `messages` that are not a list of messages"
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("role", "content"))):
                return f"has a message {i} without a string `role` and `content`"
        return None
    if "text" in row:
        return None if isinstance(row["text"], str) else "has a `text` that is not a string"
    missing = [k for k in ("system", "news") if not isinstance(row.get(k), str)]
    if missing:
        return f"lacks the text field(s) {', '.join(missing)} (or a `text`, or `messages`)"
    return None


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
