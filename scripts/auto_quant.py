"""Choose the GGUF to ship: the smallest mix of types, tensor by tensor, that passes the quality gate.

    python -m scripts.auto_quant --llama-bin BIN --sensitivity results/m/auto/sensitivity.tsv \
        --gguf results/m/ggml-model-f16.gguf --imatrix results/m/imatrix.gguf \
        --logits results/m/report/f16-logits.kld --merged results/m/merged --heldout heldout.jsonl \
        --budget 3 --out results/m/ggml-model-auto.gguf --recipe results/m/auto/recipe.txt \
        --record results/m/auto/search.json --threads 8

From the tensors' measured sensitivity (scripts.measure_sensitivity), the mixes that lose least for their
size (cpuforge.autoquant.frontier); candidates among them made from their recipe, each tensor quantized in a
type once as llama-quantize quantizes it (cpuforge.autoquant.tensors), their types checked in the written
header, and measured as the report measures a quant: KL divergence and perplexity on the held-out text for
each, then task accuracy on the held-out rows for the smallest that passes them, going on above it while the
accuracy misses (cpuforge.autoquant.search). With --max-size-mib or --max-bpw, the least lossy mix within
that size instead. Writes the chosen GGUF (its recipe in its provenance), the recipe as llama-quantize's
--tensor-type-file, and the search record (every candidate: size, bpw, KL, accuracy, seconds). When no
candidate passes, it fails with one sentence naming the best candidate and the figures it missed. The
chosen file is then a stage like every other: the report measures it again, as it measures q4_0.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from cpuforge.autoquant import recipe
from cpuforge.autoquant.frontier import sweep
from cpuforge.autoquant.search import Gate
from cpuforge.autoquant.sensitivity import quantizable, read_table
from cpuforge.autoquant.tensors import Tensors
from cpuforge.autoquant.verify import MIB, Inputs, run_search, summary
from cpuforge.cli import add_flags, check_threads, run
from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output, read_json, write_json
from cpuforge.io.gguf import check_gguf, read_header
from cpuforge.io.provenance import provenance, write_provenance
from cpuforge.paths import source_record
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
    parser.add_argument("--max-kl-divergence", type=float, required=True)
    parser.add_argument("--max-ppl-increase-pct", type=float, required=True)
    parser.add_argument("--min-accuracy", type=float, required=True)
    parser.add_argument("--budget", type=int, default=3, help="candidates made and measured, at most")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-size-mib", type=float, help="the least lossy mix of at most this size instead")
    size.add_argument("--max-bpw", type=float, help="the least lossy mix of at most these bits per weight instead")
    parser.add_argument("--recipe", type=Path, required=True, help="the chosen mix, as a --tensor-type-file")
    parser.add_argument("--record", type=Path, required=True, help="the search record (JSON)")
    args = parser.parse_args()
    threads = check_threads(args.threads)
    if args.budget < 1:
        raise InputError(f"auto_quant.budget must be at least 1, got {args.budget}.")
    check_gguf(args.gguf)
    table = read_table(args.sensitivity)
    header = read_header(args.gguf)
    shapes = {t.name: t.n_elements for t in header.tensors.values() if quantizable(t.name, t.shape)}
    if set(table) != set(shapes):
        raise InputError(f"{args.sensitivity}: its tensors are not those of {args.gguf}; measure it again.")
    frontier = sweep(table)
    n_elements = sum(shapes.values())
    fixed = args.gguf.stat().st_size - sum(header.tensors[n].n_bytes for n in shapes)
    max_bytes = None
    if args.max_size_mib is not None:
        max_bytes = int(args.max_size_mib * MIB) - fixed
    elif args.max_bpw is not None:
        max_bytes = int(args.max_bpw * n_elements / 8)
    rows = read_heldout(args.heldout) if args.heldout else []
    gate = Gate(args.max_kl_divergence, args.max_ppl_increase_pct, args.min_accuracy if rows else None)
    log.info("frontier: %d mixes, %.1f to %.1f MiB of tensors", len(frontier), frontier.bytes(0) / MIB,
             frontier.bytes(len(frontier) - 1) / MIB)  # fmt: skip
    started = time.monotonic()
    with atomic_output(args.out) as tmp:
        quantized = tmp.with_name(tmp.name + ".tensors")
        try:
            tensors = Tensors(args.llama_bin, args.gguf, args.imatrix, quantized, threads)
            inp = Inputs(args.llama_bin, tensors, args.logits, args.ctx_size, args.merged, rows, args.max_new_tokens,
                         threads, tmp)  # fmt: skip
            k, results = run_search(inp, frontier, gate, n_elements, args.budget, max_bytes)
            types = {name: o.type for name, o in frontier.mix(k).items()}
            source = source_record(args.llama_bin)
            inputs = {"gguf": args.gguf, "sensitivity": args.sensitivity, "logits": args.logits,
                      **({"imatrix": args.imatrix} if args.imatrix else {})}  # fmt: skip
            record = provenance(args.out, inputs, step="quantize", type="auto", recipe=types,
                                llama_cpp=read_json(source) if source.is_file() else None)  # fmt: skip
            tensors.write(types, tmp, record)
        finally:
            shutil.rmtree(quantized, ignore_errors=True)
    write_provenance(args.out, record)
    with atomic_output(args.recipe) as tmp:
        recipe.write(tmp, types)
    r = results[k]
    write_json(args.record, summary(frontier, table, results, k, gate, args.budget, max_bytes,
                                        time.monotonic() - started))
    log.info("chosen: point %d, %.1f MiB (%.2f bpw), KL %.4f%s", k, r["size_bytes"] / MIB, r["bpw"], r["kl_divergence"],
             f", accuracy {r['correct']}/{r['rows']}" if "correct" in r else "")  # fmt: skip


if __name__ == "__main__":
    run(main)
