"""A fixed-format task (the demo's or a user's): its data, checks and greedy exact-match evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from scripts.common import InputError

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_task"
FIELDS = ("system", "news", "answer")


def check_task_dir(task_dir: Path) -> None:
    """A task folder holds heldout.jsonl whose rows are JSON objects with the string fields of data/demo_task."""
    heldout = Path(task_dir) / "heldout.jsonl"
    if not heldout.is_file():
        raise InputError(f"{heldout}: not found; a task folder holds heldout.jsonl in the format of data/demo_task.")
    with open(heldout) as f:
        lines = f.read().splitlines()
    if not lines:
        raise InputError(f"{heldout}: holds no rows.")
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{heldout}: line {number} is not a JSON object.") from None
        missing = [k for k in FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{heldout}: line {number} lacks the text field(s) {', '.join(missing)}.")


def load_split(name: str, task_dir: Path = TASK_DIR) -> list[dict]:
    with open(task_dir / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def as_text(rows: list[dict]) -> str:
    """Rows as plain text, news then answer, for the perplexity text."""
    return "\n\n".join(f"{r['news']}\n{r['answer']}" for r in rows)


def messages(row: dict) -> list[dict]:
    return [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["news"]}]


def prompt_ids(tokenizer, row: dict) -> list[int]:
    return tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=True, return_dict=False)


def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """Greedy answers from a HF model, batched with left padding."""
    import torch

    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    for start in range(0, len(rows), batch_size):
        prompts = [prompt_ids(tokenizer, r) for r in rows[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=[t for t in (stop, tokenizer.eos_token_id) if t is not None],
            )  # fmt: skip
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
        log.info("generated %d/%d answers", len(answers), len(rows))
    return answers


def exact_match(answers: list[str], rows: list[dict]) -> float:
    return sum(a == r["answer"] for a, r in zip(answers, rows, strict=True)) / len(rows)
