"""The CLI of the convert step, described once in cpuforge.llama.convert's docstring (--help shows it)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.llama.convert import OUTTYPES, convert
from cpuforge.io.files import read_json
from cpuforge.io.provenance import provenance, write_provenance
import cpuforge.llama.convert as library

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=library.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
