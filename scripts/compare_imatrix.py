"""Measure what the importance matrix buys a quant type: the same type made with and without it.

    python -m scripts.compare_imatrix --llama-bin BUILD/bin --f16 results/demo/ggml-model-f16.gguf \
        --quant results/demo/ggml-model-iq2_xxs.gguf --imatrix results/demo/imatrix.gguf --type iq2_xxs \
        --heldout data/demo_task/heldout.jsonl --out results/demo/checks/imatrix-iq2_xxs.json --threads 8

`--quant` is the workflow's file, made with the matrix. The same type is made
again without it in a scratch file; a type that llama.cpp cannot make without a
matrix (IQ1/IQ2, …) gets a uniform one instead, every column weighted alike,
which is what "no information" means to its rounding. Both are scored on the
evaluation half of the prose (never the calibration half): perplexity and KL
divergence and top-token agreement against the f16 GGUF through the pinned
`llama-perplexity`, and exact match on the held-out task prompts, greedy,
through llama-cpp-python's chat path.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from scripts.common import (
    NEEDS_IMATRIX,
    atomic_output,
    check_quant_type,
    check_threads,
    load_llama_cpp,
    provenance,
    run,
    run_llama_tool,
    write_provenance,
)
from scripts.eval_kl_divergence import parse_kl_output
from scripts.quantize import quantize
from scripts.task import exact_match, gguf_greedy_answers, has_prompts, prose, read_rows

log = logging.getLogger(__name__)

def uniform_imatrix(real: Path, out: Path) -> None:
    """An importance matrix with the entries of `real` and every weight 1: each column equally important."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(real)
    writer = GGUFWriter(out, arch="imatrix")
    for field in reader.fields.values():
        if field.name.startswith("imatrix.") or field.name == "general.type":
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
    tensors = {t.name: t for t in reader.tensors}
    for name, tensor in tensors.items():
        data = np.array(tensor.data, dtype=np.float32)
        if name.endswith(".in_sum2"):
            # one row of sums per matrix (per expert), each divided by its count: make every mean 1
            counts = np.array(tensors[name.removesuffix(".in_sum2") + ".counts"].data, dtype=np.float32).reshape(-1, 1)
            data = np.repeat(counts, data.size // counts.size, axis=1).reshape(data.shape)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def perplexity(bin_dir: Path, model: Path, base: Path, threads: int, text: Path | None = None, ctx: int = 512,
               chunks: int = 0) -> dict:  # fmt: skip
    """Run llama-perplexity: with `text`, on f16, saving its logits to `base`; else scoring `model` against them."""
    args = ["-m", model, "-t", threads, "-tb", threads, "--kl-divergence-base", base]
    if text is not None:
        run_llama_tool(bin_dir / "llama-perplexity", [*args, "-f", text, "-c", ctx, "--chunks", chunks or -1])
        return {}
    return parse_kl_output(run_llama_tool(bin_dir / "llama-perplexity", [*args, "--kl-divergence"]))


def task_accuracy(bin_dir: Path, model: Path, rows: list[dict], threads: int) -> float:
    llama_cpp = load_llama_cpp(bin_dir)
    llm = llama_cpp.Llama(str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    return exact_match(gguf_greedy_answers(llm, rows), rows)


def compare(bin_dir, f16, quant, imatrix, qtype, heldout, out, threads, ctx=512, chunks=20, prompts=0) -> dict:
    rows = read_rows(heldout) if heldout else []
    rows = (rows[:prompts] if prompts else rows) if has_prompts(rows) else []
    record = {
        "type": qtype,
        "with": {"artifact": quant.name},
        "without": {"made_with": "a uniform importance matrix" if qtype in NEEDS_IMATRIX else "no importance matrix"},
        "eval": {"text": "Python documentation topics, evaluation half", "ctx_size": ctx, "chunks": chunks,
                 "task_prompts": len(rows)},
    }  # fmt: skip
    with atomic_output(out) as tmp:
        text, base = tmp.with_name(tmp.name + ".txt"), tmp.with_name(tmp.name + ".kld")
        without, uniform = tmp.with_name(tmp.name + ".without.gguf"), tmp.with_name(tmp.name + ".uniform.gguf")
        text.write_text(prose("evaluation"), encoding="utf-8")
        weights = None
        if qtype in NEEDS_IMATRIX:
            uniform_imatrix(imatrix, uniform)
            weights = uniform
        facts = {"step": "compare_imatrix", "note": "scratch quant without the workflow's importance matrix"}
        quantize(bin_dir / "llama-quantize", f16, without, qtype, threads, facts, weights)
        perplexity(bin_dir, f16, base, threads, text, ctx, chunks)  # the f16 logits every quant is scored against
        for side, model in (("with", quant), ("without", without)):
            kl = perplexity(bin_dir, model, base, threads)
            record[side] |= {k: kl[k] for k in ("perplexity", "kl_divergence", "top1_agreement")}
            if rows:
                record[side]["task_exact_match"] = task_accuracy(bin_dir, model, rows, threads)
            log.info("%s %s the importance matrix: %s", qtype, side, record[side])
        # both runs score against the same saved f16 logits, so either states the f16 perplexity
        record["f16"] = {"perplexity": kl["f16_perplexity"]}
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bin", type=Path, required=True, help="the pinned llama.cpp bin folder")
    parser.add_argument("--f16", type=Path, required=True)
    parser.add_argument("--quant", type=Path, required=True, help="the quant made with the importance matrix")
    parser.add_argument("--imatrix", type=Path, required=True)
    parser.add_argument("--type", required=True)
    parser.add_argument("--heldout", type=Path, help="JSONL of held-out task prompts (task accuracy)")
    parser.add_argument("--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=20, help="perplexity chunks (0: all the text gives)")
    parser.add_argument("--prompts", type=int, default=0, help="held-out prompts to answer (0: all)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    qtype = check_quant_type(args.type)
    record = compare(
        args.llama_bin, args.f16, args.quant, args.imatrix, qtype, args.heldout, args.out,
        check_threads(args.threads), args.ctx_size, args.chunks, args.prompts,
    )  # fmt: skip
    inputs = {"f16": args.f16, "quant": args.quant, "imatrix": args.imatrix}
    write_provenance(args.out, provenance(args.out, inputs, step="compare_imatrix", type=qtype))
    log.info("%s with and without the importance matrix written to %s: %s", qtype, args.out, json.dumps(record))


if __name__ == "__main__":
    run(main)
