"""Convert one PEFT LoRA adapter to a GGUF LoRA with the pinned llama.cpp convert_lora_to_gguf.py.

    python -m scripts.convert_adapter --source BUILD/source --adapter A --hf results/demo/base \
        --out results/demo/adapters/1-demo.gguf

The converter reads the base's config (--hf: the unmerged base folder) and writes the
adapter's low-rank pairs and its lora_alpha; llama.cpp applies them at run time
(`scripts.chat BASE.gguf --lora FILE`, `scripts.serve BASE.gguf --lora NAME=FILE`).
It writes to a scratch file that is copied, with cpuforge's provenance added to the GGUF
metadata (`cpuforge.convert_lora`), to a `.partial` name, renamed when all of it succeeded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import read_json
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.llama.convert_adapter import convert_adapter

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT LoRA folder")
    add_flags(parser, "hf", "out", "threads", hf={"required": True, "help": "the base's HF folder (its config)"})
    parser.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16")
    args = parser.parse_args()
    facts = {"step": "convert_lora", "outtype": args.outtype, "llama_cpp": read_json(args.source / "SOURCE.json")}
    record = provenance(args.out, {"adapter": args.adapter, "base_config": args.hf / "config.json"}, **facts)
    convert_adapter(args.source, args.adapter, args.hf, args.out, args.outtype, check_threads(args.threads), record)
    write_provenance(args.out, record)
    log.info("GGUF LoRA written to %s", args.out)


if __name__ == "__main__":
    run(main)
