"""Convert a merged HF model folder to a GGUF file with the pinned llama.cpp converter.

Runs `convert_hf_to_gguf.py` and `gguf-py` from the same verified llama.cpp
source that the quantizer and the runtime were built from. The converter
writes to its output name directly, so here it writes a scratch file that is
copied, with cpuforge's provenance added to the GGUF metadata, to a `.partial`
name, renamed only when all of it succeeded.

The GGUF must tokenize as transformers does with the merged folder, and the
converter reads tokenizer files its own way. So it reads a staged view of the
folder whose sentencepiece files state what transformers uses (scores in the
order of tokenizer.json's merges, tokenizer.json's added tokens), and the copy
states transformers' BOS/EOS behaviour and chat template in the metadata.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.llama.convert import OUTTYPES, convert
from cpuforge.io.files import read_json
from cpuforge.io.provenance import provenance, write_provenance

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    add_flags(parser, "merged", "out", "threads", merged={"help": "HF model folder (the merged model)"})
    parser.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    parser.add_argument("--model-name", help="general.name of the GGUF (default: the model folder's name)")
    args = parser.parse_args()
    facts = {"step": "convert", "outtype": args.outtype, "llama_cpp": read_json(args.source / "SOURCE.json")}
    record = provenance(args.out, {"model": args.merged}, **facts)
    name = args.model_name or args.merged.name
    convert(args.source, args.merged, args.out, args.outtype, check_threads(args.threads), record, name)
    write_provenance(args.out, record)
    log.info("GGUF written to %s", args.out)


if __name__ == "__main__":
    run(main)
