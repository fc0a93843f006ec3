"""Write the perplexity text of a model: its task's held-out rows, then real prose.

    python -m scripts.make_eval_text --text pydoc_topics [--heldout data/demo_task/heldout.jsonl] --out eval_text.txt

The default prose is the text of Python's own documentation topics
(`pydoc_data.topics`): real prose that nobody in this project wrote and that
ships with Python, so the report needs no download. The task rows come first
so that they are always inside the scored windows, however many windows the
config asks for; the prose fills the rest.
"""

from __future__ import annotations

import argparse
import logging

from cpuforge.cli import add_flags, run
from cpuforge.io.files import atomic_output
from cpuforge.evaluate.perplexity import PYDOC, eval_text

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=PYDOC, help=f"`{PYDOC}` or a UTF-8 text file")
    add_flags(parser, "heldout", "out", heldout={"help": "the task's held-out JSONL, whose rows come first"})
    args = parser.parse_args()
    text = eval_text(args.text, args.heldout)
    with atomic_output(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("%d characters written to %s", len(text), args.out)


if __name__ == "__main__":
    run(main)
