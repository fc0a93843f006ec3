"""Print where a GGUF file came from: its general.* metadata and cpuforge's provenance records.

    python -m scripts.inspect results/demo/ggml-model-q4_0.gguf [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpuforge.cli import run
from cpuforge.provenance import read_history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    history = read_history(args.gguf)
    if args.json:
        print(json.dumps(history, indent=2, sort_keys=True))
        return
    for key, value in history["general"].items():
        print(f"{key}: {value}")
    print(f"tensors: {history['tensors']}")
    for step, record in history["cpuforge"].items():
        print(f"\n[{step}]")
        print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    run(main)
