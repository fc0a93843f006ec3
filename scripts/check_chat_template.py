"""Check that the chat and the server on a GGUF feed the model the token ids transformers gives.

    python -m scripts.check_chat_template --gguf results/demo/ggml-model-q4_0.gguf --merged results/demo/merged \
        --heldout data/demo_task/heldout.jsonl --llama-bin BUILD/bin --out results/demo/checks/chat-template-q4_0.json

For fixed conversations (system + user, multi-turn with the assistant's history,
user only, system + multi-turn) and the task's held-out prompts (--heldout), the
ids the chat (scripts.chat's GGUF path) and the server (what scripts.serve's proxy
sends llama-server) really evaluate must equal transformers' `apply_chat_template`
ids on the merged folder; how many did is recorded per runtime, with llama.cpp's
own tokenization of the GGUF's template beside them for the record. Metadata and
tokenizers only, no weights. A model without a template passes with a message:
chat on it is plain completion, never a guessed template.
"""

from __future__ import annotations

import argparse
import logging

from cpuforge.cli import add_flags, run
from cpuforge.errors import InputError
from cpuforge.io.files import write_json
from cpuforge.checks.chat_template import check_chat_template

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "merged", "heldout", "llama-bin", "out")
    args = parser.parse_args()
    for path in (args.gguf, args.merged, *([args.heldout] if args.heldout else [])):
        if not path.exists():
            raise InputError(f"{path}: not found.")
    record = check_chat_template(args.gguf, args.merged, args.llama_bin, args.heldout)
    write_json(args.out, record, ensure_ascii=False)
    log.info("chat template parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
