"""Write the perplexity text of a model: its task's held-out rows, then real prose.

    python -m scripts.make_eval_text --text pydoc_topics [--task data/demo_task/heldout.jsonl] --out eval_text.txt

The default prose is the text of Python's own documentation topics
(`pydoc_data.topics`): real prose that nobody in this project wrote and that
ships with Python, so the report needs no download. The task rows come first
so that they are always inside the scored windows, however many windows the
config asks for; the prose fills the rest.
"""

import argparse
import logging
from pathlib import Path

from scripts.common import InputError, atomic_output, run
from scripts.task import as_text, read_heldout

log = logging.getLogger(__name__)

PYDOC = "pydoc_topics"


def prose(text: str) -> str:
    if text == PYDOC:
        from pydoc_data.topics import topics

        # sorted, so the text is the same whatever order the module keeps its dict in
        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    try:
        return Path(text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{text}: text file not found.") from None
    except UnicodeDecodeError:
        raise InputError(f"{text}: not a UTF-8 text file.") from None


def eval_text(text: str, task: Path | None) -> str:
    parts = []
    if task is not None:
        parts.append(as_text(read_heldout(task)))
    parts.append(prose(text))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=PYDOC, help=f"`{PYDOC}` or a UTF-8 text file")
    parser.add_argument("--task", type=Path, help="the task's held-out JSONL, whose rows come first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = eval_text(args.text, args.task)
    with atomic_output(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("%d characters written to %s", len(text), args.out)


if __name__ == "__main__":
    run(main)
