"""Prompt and generation speed of a merged GGUF and of its unmerged base with the adapters applied at run time.

    python -m scripts.bench_runtime_lora --gguf results/demo/ggml-model-q4_0.gguf \
        --base results/demo/base-q4_0.gguf --lora results/demo/adapters/1-demo.gguf \
        --llama-bin BIN --threads 2 --out results/demo/report/runtime_lora/q4_0-speed.json

llama-bench cannot load a LoRA, so both go through the same code (cpuforge.evaluate.lora_speed.speed_side_by_side:
llama-cpp-python on the pinned libllama, llama-bench's pp and tg tests), in turns, each its best round.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import write_json
from cpuforge.evaluate.lora_speed import speed_side_by_side

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "llama-bin", "out", "threads", gguf={"help": "the merged GGUF"})
    parser.add_argument("--base", type=Path, required=True, help="the unmerged base GGUF, of the same quant type")
    add_flags(parser, "lora", lora={"required": True, "help": "a GGUF LoRA applied to --base (repeat, in order)"})
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = speed_side_by_side(args.gguf, args.base, args.lora, args.llama_bin, check_threads(args.threads),
                                args.prompt_tokens, args.gen_tokens, args.rounds)  # fmt: skip
    write_json(args.out, result)
    ratio = result["runtime_lora"]["tg_tps"] / result["merged"]["tg_tps"]
    log.info("runtime LoRA generates at %.2fx the merged speed", ratio)


if __name__ == "__main__":
    run(main)
