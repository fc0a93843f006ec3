"""Measure how much each tensor of the f16 GGUF loses in each candidate type, on the model's own data.

    python -m scripts.measure_sensitivity --llama-bin BIN --gguf results/m/ggml-model-f16.gguf \
        --imatrix results/m/imatrix.gguf --types q8_0 q4_K q4_0 iq2_xxs --sample-weights 131072 \
        --out results/m/auto/sensitivity.tsv

For every matrix and every type that fits its rows, ggml's own quantizer (as llama-quantize runs it, with
the importance matrix) rounds an evenly spaced sample of rows, `--sample-weights` weights of each, on
`--threads` threads; the table gives the bytes the
tensor would take in that type and its relative output noise, weighted by the importance matrix (the
task's training rows and prose, never the held-out rows): cpuforge.autoquant.sensitivity.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.autoquant.sensitivity import measure, write_table
from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.gguf import check_gguf
from cpuforge.io.provenance import provenance, write_provenance

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "out", "threads", gguf={"help": "the f16 GGUF"})
    parser.add_argument("--imatrix", type=Path, help="importance matrix (llama-imatrix's GGUF); else every column weighs 1")
    parser.add_argument("--types", nargs="+", required=True, metavar="TYPE", help="ggml tensor types to try")
    parser.add_argument("--sample-weights", type=int, default=1 << 17,
                        help="weights sampled per tensor, in whole rows, at least 16 (0: every row)")
    args = parser.parse_args()
    check_gguf(args.gguf)
    if args.imatrix is not None:
        check_gguf(args.imatrix)
    table = measure(args.llama_bin, args.gguf, args.imatrix, args.types, args.sample_weights, check_threads(args.threads))
    write_table(args.out, table)
    inputs = {"gguf": args.gguf, **({"imatrix": args.imatrix} if args.imatrix else {})}
    write_provenance(args.out, provenance(args.out, inputs, step="measure_sensitivity", types=args.types,
                                                 sample_weights=args.sample_weights))
    log.info("%d tensors x %d types measured into %s", len(table), len(args.types), args.out)


if __name__ == "__main__":
    run(main)
