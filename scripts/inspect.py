"""Print where a GGUF file came from: its general.* metadata and cpuforge's provenance records.

    python -m scripts.inspect results/demo/ggml-model-q4_0.gguf [--json]
"""

import argparse
import json
from pathlib import Path

from scripts.common import InputError, run

GGUF_MAGIC = b"GGUF"


def read_history(path: Path) -> dict:
    """general.* fields and the decoded cpuforge.* provenance records of a GGUF file."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file.")
    reader = GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    return {
        "general": {k: v for k, v in fields.items() if k.startswith("general.")},
        "cpuforge": {k.removeprefix("cpuforge."): json.loads(v) for k, v in fields.items() if k.startswith("cpuforge.")},
        "tensors": len(reader.tensors),
    }


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
