"""What the importance matrix buys a quant type: the same type made with and without it (compare_imatrix).

The type is made again without the matrix in a scratch file; a type that llama.cpp cannot make without one
(IQ1/IQ2, …) gets a uniform matrix instead, every column weighted alike. Both are scored on the evaluation
half of the prose (never the calibration half that made the matrix, cpuforge.llama.imatrix): perplexity, KL
divergence and top-token agreement against the f16 GGUF through the pinned `llama-perplexity`, and exact
match on the held-out task prompts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.evaluate.perplexity import parse_kl_output
from cpuforge.io.files import atomic_output, write_json
from cpuforge.io.gguf import open_gguf
from cpuforge.llama.quant import NEEDS_IMATRIX, quantize
from cpuforge.llama.runtime import LOAD_MODE, load_llama_cpp, load_model, run_llama_tool
from cpuforge.text.generate import gguf_greedy_answers
from cpuforge.text.prompt import prompt_ids
from cpuforge.text.task import exact_match, has_prompts, prose, read_rows

log = logging.getLogger(__name__)


def uniform_imatrix(real: Path, out: Path) -> None:
    """An importance matrix with the entries of `real` and every weight 1: each column equally important."""
    import numpy as np
    from gguf import GGUFWriter

    reader = open_gguf(real)
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
    args = ["-m", model, "-t", threads, "-tb", threads, "--kl-divergence-base", base, *LOAD_MODE]
    if text is not None:
        run_llama_tool(bin_dir / "llama-perplexity", [*args, "-f", text, "-c", ctx, "--chunks", chunks or -1])
        return {}
    return parse_kl_output(run_llama_tool(bin_dir / "llama-perplexity", [*args, "--kl-divergence"]))


def task_accuracy(bin_dir: Path, model: Path, prompts: list[list[int]], rows: list[dict], threads: int) -> float:
    """Exact match of the GGUF's greedy answers to the rows' prompts, given as transformers' token ids."""
    llama_cpp = load_llama_cpp(bin_dir)
    llm = load_model(llama_cpp, model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    return exact_match(gguf_greedy_answers(llm, prompts), rows)


def task_prompts(merged: Path, rows: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    return [prompt_ids(tokenizer, r) for r in rows]


def compare(bin_dir, f16, merged, quant, imatrix, qtype, heldout, out, threads, ctx=512, chunks=20, prompts=0) -> dict:
    rows = read_rows(heldout) if heldout else []
    rows = (rows[:prompts] if prompts else rows) if has_prompts(rows) else []
    ids = task_prompts(merged, rows) if rows else []
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
        quantize(bin_dir, f16, without, qtype, threads, facts, weights)
        perplexity(bin_dir, f16, base, threads, text, ctx, chunks)  # the f16 logits every quant is scored against
        for side, model in (("with", quant), ("without", without)):
            kl = perplexity(bin_dir, model, base, threads)
            record[side] |= {k: kl[k] for k in ("perplexity", "kl_divergence", "top1_agreement")}
            if rows:
                record[side]["task_exact_match"] = task_accuracy(bin_dir, model, ids, rows, threads)
            log.info("%s %s the importance matrix: %s", qtype, side, record[side])
        # both runs score against the same saved f16 logits, so either states the f16 perplexity
        record["f16"] = {"perplexity": kl["f16_perplexity"]}
        write_json(tmp, record)
    return record
