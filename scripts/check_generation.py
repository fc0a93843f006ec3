"""Check that the f16 GGUF answers the held-out prompts as the merged HF model does, greedily.

    python -m scripts.check_generation --gguf results/demo/ggml-model-f16.gguf --merged results/demo/merged \
        --heldout data/demo_task/heldout.jsonl --llama-bin BUILD/bin --out results/demo/checks/generation.json

Both read the same prompts, as training saw them: the token ids of transformers'
`apply_chat_template` on the merged model's tokenizer (cpuforge.text.prompt). The GGUF
answers first, through llama-cpp-python on the pinned libllama (temperature 0),
and is closed; then one teacher-forced pass of the merged model in float32,
streamed a decoder layer at a time, over each prompt + the GGUF's answer tells
whether the merged model's greedy answer (`do_sample=False`) is the same: its
greedy choice must be the GGUF's token at every answer position, and a stop
token where the GGUF stopped. A model without a chat template answers both ways
by plain completion of the prompt's turns, a line each. The answers must be
equal on at least `--min-agreement` of the prompts; f16 rounding of the weights
explains the rest. The record holds each prompt's first differing answer token
and the GGUF's exact match against the task's answers.
"""

from __future__ import annotations

import argparse
import logging

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.errors import InputError
from cpuforge.io.files import write_json
from cpuforge.checks.generation import check_generation

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "merged", "heldout", "llama-bin", "out", "threads", gguf={"help": "the f16 GGUF"},
              heldout={"required": True})  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-agreement", type=float, default=0.9)
    parser.add_argument("--prompts", type=int, default=0, help="use the first N prompts (0: all)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(check_threads(args.threads))
    for path in (args.gguf, args.merged, args.heldout):
        if not path.exists():
            raise InputError(f"{path}: not found.")
    record = check_generation(
        args.gguf, args.merged, args.heldout, args.llama_bin, args.threads,
        args.max_new_tokens, args.min_agreement, args.prompts,
    )  # fmt: skip
    write_json(args.out, record, ensure_ascii=False)
    log.info("generation parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
