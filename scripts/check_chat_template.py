"""Check that a GGUF's chat template builds the prompts transformers builds, to the character.

    python -m scripts.check_chat_template --gguf results/demo/ggml-model-q4_0.gguf --merged results/demo/merged \
        --llama-bin BUILD/bin --out results/demo/checks/chat-template-q4_0.json

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

import argparse
import json
import logging

from cpuforge.cli import add_flags, run
from cpuforge.errors import InputError
from cpuforge.files import atomic_output
from cpuforge.template_parity import check_chat_template

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "merged", "llama-bin", "out")
    args = parser.parse_args()
    for path in (args.gguf, args.merged):
        if not path.exists():
            raise InputError(f"{path}: not found.")
    record = check_chat_template(args.gguf, args.merged, args.llama_bin)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("chat template parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
