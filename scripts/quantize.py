"""Quantize a GGUF file with the pinned llama-quantize.

    python -m scripts.quantize --llama-bin BUILD/bin --gguf f16.gguf --out q4_0.gguf --type q4_0 --threads 8
    python -m scripts.quantize ... --type iq2_xxs --imatrix imatrix.gguf

llama-quantize copies the input's metadata (cpuforge's convert provenance
included); this step adds its own under `cpuforge.quantize`. A type that
llama.cpp makes only with an importance matrix is refused without one before
any work.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import read_json
from cpuforge.io.gguf import check_gguf
from cpuforge.paths import source_record
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.llama.quant import check_imatrix, check_quant_type, quantize

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "out", "threads", gguf={"help": "f16 (or f32) GGUF"})
    parser.add_argument("--type", required=True, help="llama.cpp quantization type, e.g. q4_0")
    parser.add_argument("--imatrix", type=Path, help="importance matrix (llama-imatrix's GGUF) to weight the rounding")
    args = parser.parse_args()
    qtype = check_quant_type(args.type)
    check_gguf(args.gguf)
    check_imatrix(qtype, args.imatrix)
    source = source_record(args.llama_bin)
    llama_cpp = read_json(source) if source.is_file() else None
    inputs = {"gguf": args.gguf, **({"imatrix": args.imatrix} if args.imatrix else {})}
    record = provenance(args.out, inputs, step="quantize", type=qtype, llama_cpp=llama_cpp)
    quantize(args.llama_bin, args.gguf, args.out, qtype, check_threads(args.threads), record, args.imatrix)
    write_provenance(args.out, record)
    log.info("%s written to %s", qtype, args.out)


if __name__ == "__main__":
    run(main)
