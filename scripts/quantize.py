"""Quantize a GGUF file with the pinned llama-quantize.

    python -m scripts.quantize --quantize BUILD/bin/llama-quantize --in f16.gguf --out q4_0.gguf --type q4_0 --threads 8
"""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from scripts.common import InputError, atomic_output, check_quant_type, check_threads, run, write_provenance

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


def quantize(llama_quantize: Path, src: Path, out: Path, qtype: str, threads: int) -> None:
    check_gguf(src)
    with atomic_output(out) as tmp:
        cmd = [str(llama_quantize), str(src), str(tmp), qtype.upper(), str(threads)]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", type=Path, required=True, help="the pinned llama-quantize")
    parser.add_argument("--in", dest="src", type=Path, required=True, help="f16 (or f32) GGUF")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--type", required=True, help="llama.cpp quantization type, e.g. q4_0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    qtype = check_quant_type(args.type)
    quantize(args.quantize, args.src, args.out, qtype, check_threads(args.threads))
    write_provenance(args.out, {"gguf": args.src}, step="quantize", type=qtype)
    log.info("%s written to %s", qtype, args.out)


if __name__ == "__main__":
    run(main)
