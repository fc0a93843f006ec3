"""Print where a GGUF file came from: its general.* metadata and cpuforge's provenance records,
and the CPU code its llama.cpp build runs it with on this machine (variant, features, AMX).

    python -m scripts.inspect results/demo/ggml-model-q4_0.gguf [--json] [--llama-bin BIN]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpuforge.cli import run
from cpuforge.llama.runtime import cpu_backend, describe_cpu_backend
from cpuforge.paths import default_llama_bin
from cpuforge.io.provenance import read_history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the GGUF's build)")
    args = parser.parse_args()
    history = read_history(args.gguf)
    llama_bin = args.llama_bin or default_llama_bin(args.gguf)
    if (llama_bin / "libggml.so").is_file():
        history["cpu_backend"] = {"llama_bin": str(llama_bin.resolve()), **cpu_backend(llama_bin)}
    if args.json:
        print(json.dumps(history, indent=2, sort_keys=True))
        return
    for key, value in history["general"].items():
        print(f"{key}: {value}")
    print(f"tensors: {history['tensors']}")
    for step, record in history["cpuforge"].items():
        print(f"\n[{step}]")
        print(json.dumps(record, indent=2, sort_keys=True))
    if "cpu_backend" in history:
        print(f"\nruns here with {history['cpu_backend']['llama_bin']}: {describe_cpu_backend(history['cpu_backend'])}")


if __name__ == "__main__":
    run(main)
