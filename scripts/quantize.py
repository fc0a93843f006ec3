"""Quantize a GGUF file with the pinned llama-quantize.

    python -m scripts.quantize --quantize BUILD/bin/llama-quantize --in f16.gguf --out q4_0.gguf --type q4_0 --threads 8
    python -m scripts.quantize ... --type iq2_xxs --imatrix imatrix.gguf

llama-quantize copies the input's metadata (cpuforge's convert provenance
included); this step adds its own under `cpuforge.quantize`. A type that
llama.cpp makes only with an importance matrix is refused without one before
any work.
"""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from scripts.common import (
    NEEDS_IMATRIX,
    InputError,
    atomic_output,
    check_quant_type,
    check_threads,
    copy_gguf_with_provenance,
    provenance,
    read_json,
    run,
    write_provenance,
)

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found.") from None
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r}).")


def check_imatrix(qtype: str, imatrix: Path | None) -> None:
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise InputError(f"{qtype} needs an importance matrix (--imatrix): llama-quantize cannot make it without one.")
    if imatrix is not None:
        check_gguf(imatrix)


def quantize(
    llama_quantize: Path, src: Path, out: Path, qtype: str, threads: int, record: dict, imatrix: Path | None = None
) -> None:
    check_gguf(src)
    check_imatrix(qtype, imatrix)
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".quantizer")
        weights = ["--imatrix", str(imatrix)] if imatrix else []
        cmd = [str(llama_quantize), *weights, str(src), str(scratch), qtype.upper(), str(threads)]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        copy_gguf_with_provenance(scratch, tmp, "quantize", record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", type=Path, required=True, help="the pinned llama-quantize")
    parser.add_argument("--in", dest="src", type=Path, required=True, help="f16 (or f32) GGUF")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--type", required=True, help="llama.cpp quantization type, e.g. q4_0")
    parser.add_argument("--imatrix", type=Path, help="importance matrix (llama-imatrix's GGUF) to weight the rounding")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    qtype = check_quant_type(args.type)
    check_gguf(args.src)
    check_imatrix(qtype, args.imatrix)
    source = args.quantize.resolve().parent.parent / "source" / "SOURCE.json"  # build/llama.cpp/<commit>/{bin,source}
    llama_cpp = read_json(source) if source.is_file() else None
    inputs = {"gguf": args.src, **({"imatrix": args.imatrix} if args.imatrix else {})}
    record = provenance(args.out, inputs, step="quantize", type=qtype, llama_cpp=llama_cpp)
    quantize(args.quantize, args.src, args.out, qtype, check_threads(args.threads), record, args.imatrix)
    write_provenance(args.out, record)
    log.info("%s written to %s", qtype, args.out)


if __name__ == "__main__":
    run(main)
