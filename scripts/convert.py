"""Convert a merged HF model folder to a GGUF file with the pinned llama.cpp converter.

Runs `convert_hf_to_gguf.py` and `gguf-py` from the same verified llama.cpp
source that the quantizer and the runtime were built from. The converter
writes to its output name directly, so here it writes a scratch file that is
copied, with cpuforge's provenance added to the GGUF metadata, to a `.partial`
name, renamed only when all of it succeeded.
"""

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.common import (
    InputError,
    atomic_output,
    check_threads,
    copy_gguf_with_provenance,
    provenance,
    read_json,
    run,
    safetensors_header,
    write_provenance,
)

log = logging.getLogger(__name__)

OUTTYPES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}  # bytes per weight


def check_space(model: Path, out: Path, outtype: str) -> None:
    """Fail before converting when the output's filesystem cannot hold the scratch file and its copy."""
    weights = sum(
        math.prod(t["shape"]) for f in sorted(model.glob("*.safetensors")) for t in safetensors_header(f).values()
    )
    need = 2 * weights * OUTTYPES[outtype] + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise InputError(
            f"{out.parent}: {free / 2**20:.1f} MiB free, but converting {model} to {outtype} needs about "
            f"{need / 2**20:.1f} MiB (the GGUF twice, while provenance is added)."
        )


def convert(source: Path, model: Path, out: Path, outtype: str, threads: int, record: dict, name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    check_space(model, out, outtype)
    # the converter has no thread flag; its torch work follows OMP_NUM_THREADS
    pythonpath = os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads)}
    with atomic_output(out) as tmp:
        scratch = tmp.with_name(tmp.name + ".converter")
        cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(model),
               "--outfile", str(scratch), "--outtype", outtype, "--model-name", name]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
        copy_gguf_with_provenance(scratch, tmp, "convert", record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="verified llama.cpp source folder")
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    parser.add_argument("--model-name", help="general.name of the GGUF (default: the model folder's name)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    facts = {"step": "convert", "outtype": args.outtype, "llama_cpp": read_json(args.source / "SOURCE.json")}
    record = provenance(args.out, {"model": args.model}, **facts)
    name = args.model_name or args.model.name
    convert(args.source, args.model, args.out, args.outtype, check_threads(args.threads), record, name)
    write_provenance(args.out, record)
    log.info("GGUF written to %s", args.out)


if __name__ == "__main__":
    run(main)
