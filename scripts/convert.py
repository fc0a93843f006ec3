"""Convert a merged HF model folder to a GGUF file with the pinned llama.cpp converter.

Runs `convert_hf_to_gguf.py` and `gguf-py` from the same verified llama.cpp
source that the quantizer and the runtime were built from. The converter
writes to its output name directly, so it writes to a `.partial` name here
that is renamed only when it succeeds.
"""

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from scripts.common import atomic_output, check_threads, read_json, run, write_provenance

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def convert(source: Path, model: Path, out: Path, outtype: str, threads: int) -> None:
    # the converter has no thread flag; its torch work follows OMP_NUM_THREADS
    pythonpath = os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    with atomic_output(out) as tmp:
        cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(model),
               "--outfile", str(tmp), "--outtype", outtype]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    convert(args.source, args.model, args.out, args.outtype, check_threads(args.threads))
    source = read_json(args.source / "SOURCE.json")
    write_provenance(args.out, {"model": args.model}, step="convert", outtype=args.outtype, llama_cpp=source)
    log.info("GGUF written to %s", args.out)


if __name__ == "__main__":
    run(main)
