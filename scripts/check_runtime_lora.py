"""Check that the unmerged base with its GGUF LoRA adapters applied at run time answers as the merged GGUF.

    python -m scripts.check_runtime_lora --gguf results/demo/base-f16.gguf --lora results/demo/adapters/1-demo.gguf \
        --merged-gguf results/demo/ggml-model-f16.gguf --heldout data/demo_task/heldout.jsonl \
        --llama-bin BUILD/bin --out results/demo/checks/runtime-lora-f16.json

Both answer the held-out prompts greedily through llama-cpp-python on the pinned libllama,
with their own chat template; the adapters (the stack, in order) are applied at scale 1, each
at its own alpha / r. The answers, compared token for token, must agree on at least
--min-agreement of the prompts (f16 rounding explains the rest); --no-gate records the
agreement without a threshold, as for a quantized base against the merged model quantized.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.checks.runtime_lora import check_runtime_lora
from cpuforge.io.files import write_json
from cpuforge.llama.runtime import check_threads

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "heldout", "llama-bin", "out", "threads", gguf={"help": "the unmerged base GGUF"},
              heldout={"required": True})  # fmt: skip
    add_flags(parser, "lora", lora={"required": True})
    parser.add_argument("--merged-gguf", type=Path, required=True, help="the merged model's GGUF of the same type")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-agreement", type=float, default=0.9)
    parser.add_argument("--no-gate", action="store_true", help="record the agreement, fail on no figure")
    parser.add_argument("--prompts", type=int, default=0, help="use the first N prompts (0: all)")
    args = parser.parse_args()
    record = check_runtime_lora(
        args.gguf, args.lora, args.merged_gguf, args.heldout, args.llama_bin, check_threads(args.threads),
        args.max_new_tokens, args.min_agreement, args.prompts, gated=not args.no_gate,
    )  # fmt: skip
    write_json(args.out, record, ensure_ascii=False)
    log.info("runtime LoRA parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
