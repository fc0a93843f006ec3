"""Measure what the importance matrix buys a quant type: the same type made with and without it.

    python -m scripts.compare_imatrix --llama-bin BUILD/bin --gguf results/demo/ggml-model-f16.gguf \
        --merged results/demo/merged --quant results/demo/ggml-model-iq2_xxs.gguf --imatrix results/demo/imatrix.gguf --type iq2_xxs \
        --heldout data/demo_task/heldout.jsonl --out results/demo/checks/imatrix-iq2_xxs.json --threads 8

`--quant` is the workflow's file, made with the matrix. The same type is made
again without it in a scratch file; a type that llama.cpp cannot make without a
matrix (IQ1/IQ2, …) gets a uniform one instead, every column weighted alike,
which is what "no information" means to its rounding. Both are scored on the
evaluation half of the prose (never the calibration half): perplexity and KL
divergence and top-token agreement against the f16 GGUF through the pinned
`llama-perplexity`, and exact match on the held-out task prompts, greedy,
through llama-cpp-python fed transformers' ids of each prompt (the merged
model's template and tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.evaluate.imatrix import compare
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.llama.quant import check_quant_type

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "merged", "heldout", "ctx-size", "out", "threads", gguf={"help": "the f16 GGUF"},
              merged={"help": "merged HF model folder, whose template and tokenizer build the task prompts"},
              heldout={"help": "the task's held-out JSONL (task accuracy)"})  # fmt: skip
    parser.add_argument("--quant", type=Path, required=True, help="the quant made with the importance matrix")
    parser.add_argument("--imatrix", type=Path, required=True)
    parser.add_argument("--type", required=True)
    parser.add_argument("--chunks", type=int, default=20, help="perplexity chunks (0: all the text gives)")
    parser.add_argument("--prompts", type=int, default=0, help="held-out prompts to answer (0: all)")
    args = parser.parse_args()
    qtype = check_quant_type(args.type)
    record = compare(
        args.llama_bin, args.gguf, args.merged, args.quant, args.imatrix, qtype, args.heldout, args.out,
        check_threads(args.threads), args.ctx_size, args.chunks, args.prompts,
    )  # fmt: skip
    inputs = {"f16": args.gguf, "quant": args.quant, "imatrix": args.imatrix}
    write_provenance(args.out, provenance(args.out, inputs, step="compare_imatrix", type=qtype))
    log.info("%s with and without the importance matrix written to %s: %s", qtype, args.out, json.dumps(record))


if __name__ == "__main__":
    run(main)
