"""Choose the GGUF to ship: the fastest file (or the smallest) that still answers like the fine-tune.

    python -m scripts.auto_quant --llama-bin BIN --sensitivity results/m/auto/sensitivity.tsv \
        --gguf results/m/ggml-model-f16.gguf --imatrix results/m/imatrix.gguf \
        --logits results/m/report/f16-logits.kld --merged results/m/merged --heldout heldout.jsonl \
        --reference results/m/report/task/f16.json --types q8_0 q4_0 iq4_nl \
        --listed results/m/ggml-model-q4_0.gguf --objective speed --budget 3 --gate max_kl_divergence=0.4 \
        --out results/m/ggml-model-auto.gguf --recipe results/m/auto/recipe.txt \
        --record results/m/auto/search.json --threads 8

Candidates: every --types entry as a uniform file (llama-quantize --pure), every --listed file's type as
llama-quantize makes it with and without the importance matrix (the file itself one of the two), and mixes
searched below the best passing
file; their generation speed measured side by side in one llama-bench run; each verified in the
objective's order (KL divergence against the f16 GGUF, then its answers against the f16 GGUF's on the
held-out rows) and judged by the gate, until the rest cannot be chosen (cpuforge.autoquant). With
--max-size-mib or --max-bpw, the least lossy mix within that size instead. Writes the chosen GGUF, its
recipe (a --tensor-type-file) and the search record; when nothing passes, it fails with one sentence.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.autoquant.decide import OBJECTIVES
from cpuforge.autoquant.ship import Request, auto_quant
from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.evaluate.gate import Gate
from cpuforge.text.task import read_heldout

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "llama-bin", "gguf", "merged", "heldout", "ctx-size", "out", "threads",
              gguf={"help": "the f16 GGUF"}, out={"help": "the chosen GGUF"})  # fmt: skip
    parser.add_argument("--sensitivity", type=Path, required=True, help="scripts.measure_sensitivity's table")
    parser.add_argument("--imatrix", type=Path, help="the importance matrix the sensitivity was weighted by")
    parser.add_argument("--logits", type=Path, required=True, help="f16 log-probs (eval_perplexity --save-logits)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gate", nargs="*", default=[], metavar="KEY=VALUE", help="eval.gate's limits")
    parser.add_argument("--types", nargs="+", required=True, help="the ladder: each a uniform candidate")
    parser.add_argument("--listed", nargs="*", type=Path, default=[], metavar="FILE",
                        help="the workflow's files of quant_types (scripts.quantize's), each a candidate as it is")
    parser.add_argument("--reference", type=Path, metavar="JSON",
                        help="the f16 GGUF's answers to the held-out rows (scripts.eval_task's)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="speed")
    parser.add_argument("--budget", type=int, default=3, help="searched mixes measured, at most")
    parser.add_argument("--tolerance-pct", type=float, default=5, help="speeds within this are a tie")
    parser.add_argument("--gen-tokens", type=int, default=32, help="llama-bench's generation test")
    parser.add_argument("--repetitions", type=int, default=3)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-size-mib", type=float, help="the least lossy mix of at most this size instead")
    size.add_argument("--max-bpw", type=float, help="the least lossy mix of at most these bits per weight instead")
    parser.add_argument("--recipe", type=Path, required=True, help="the chosen mix, as a --tensor-type-file")
    parser.add_argument("--record", type=Path, required=True, help="the search record (JSON)")
    args = parser.parse_args()
    if args.heldout and args.reference is None:
        parser.error("--heldout needs --reference: the f16 GGUF's answers to those rows, which every candidate's "
                     "are compared with")  # fmt: skip
    request = Request(args.types, args.listed, args.objective, args.budget, args.max_size_mib, args.max_bpw)
    bench = {"tolerance_pct": args.tolerance_pct, "gen_tokens": args.gen_tokens, "repetitions": args.repetitions}
    auto_quant(args.llama_bin, args.gguf, args.sensitivity, args.imatrix, args.logits, args.ctx_size, args.merged,
               read_heldout(args.heldout) if args.heldout else [], args.reference, args.max_new_tokens,
               Gate.parse(args.gate),
               request, bench, check_threads(args.threads), args.out, args.recipe, args.record)  # fmt: skip


if __name__ == "__main__":
    run(main)
