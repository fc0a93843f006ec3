"""Check that the f16 GGUF answers the held-out prompts as the merged HF model does, greedily.

    python -m scripts.check_generation --gguf results/demo/ggml-model-f16.gguf --merged results/demo/merged \
        --heldout data/demo_task/heldout.jsonl --llama-bin BUILD/bin --out results/demo/checks/generation.json

The GGUF answers through llama-cpp-python's chat path on the pinned libllama
(its own chat template and vocabulary, temperature 0); the merged model through
transformers in float32 (`do_sample=False`). The answers must be equal on at
least `--min-agreement` of the prompts; f16 rounding of the weights explains the
rest. Both sides' exact match against the task's answers is recorded too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from scripts.common import InputError, atomic_output, check_threads, gguf_chat_formatter, load_llama_cpp, run
from scripts.task import (
    answer,
    exact_match,
    gguf_greedy_answers,
    greedy_answers,
    has_prompts,
    messages,
    prompt_ids,
    read_rows,
)

log = logging.getLogger(__name__)

SHOWN = 10


def hf_answers(merged: Path, rows: list[dict], max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy answers of the merged model in float32, and its longest prompt in tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    if tokenizer.chat_template is None:
        raise InputError(f"{merged}: no chat template, so there are no chat prompts to compare answers on.")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    longest = max(len(prompt_ids(tokenizer, r)) for r in rows)
    return greedy_answers(model, tokenizer, rows, max_new_tokens), longest


def gguf_answers(gguf: Path, bin_dir: Path, rows: list[dict], max_new_tokens: int, n_ctx: int, threads: int) -> list[str]:
    llama_cpp = load_llama_cpp(bin_dir)
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    if gguf_chat_formatter(llm) is None:
        raise InputError(f"{gguf}: no chat template (tokenizer.chat_template), so it has no chat answers to compare.")
    return gguf_greedy_answers(llm, rows, max_new_tokens)


def check_generation(gguf, merged, heldout, bin_dir, threads, max_new_tokens=48, min_agreement=0.9, limit=0) -> dict:
    rows = read_rows(heldout)
    if not has_prompts(rows):
        raise InputError(f"{heldout}: rows need `messages` (or the demo's `system` and `news`) to be prompts.")
    rows = rows[:limit] if limit else rows
    want, longest = hf_answers(merged, rows, max_new_tokens)
    got = gguf_answers(gguf, bin_dir, rows, max_new_tokens, longest + max_new_tokens + 16, threads)
    agree = [a == b for a, b in zip(want, got, strict=True)]
    rate = sum(agree) / len(rows)
    scored = all(answer(r) is not None for r in rows)
    record = {
        "artifact": gguf.name,
        "reference": f"{merged} (transformers, float32)",
        "prompts": len(rows),
        "agree": sum(agree),
        "rate": rate,
        "min_rate": min_agreement,
        "passed": rate >= min_agreement,
        "max_new_tokens": max_new_tokens,
        "exact_match": {"hf": exact_match(want, rows), "gguf": exact_match(got, rows)} if scored else None,
        "mismatches": [
            {"prompt": messages(r)[-1]["content"], "hf": a, "gguf": b}
            for r, a, b, same in zip(rows, want, got, agree) if not same
        ][:SHOWN],
    }  # fmt: skip
    log.info("greedy answers agree on %d/%d prompts (%.1f %%)", sum(agree), len(rows), 100 * rate)
    if not record["passed"]:
        first = record["mismatches"][0]
        raise InputError(
            f"{gguf}: greedy answers agree with the merged model's on {sum(agree)} of {len(rows)} held-out prompts "
            f"({rate:.0%}, below {min_agreement:.0%}); first difference, on {first['prompt']!r}: GGUF {first['gguf']!r}, "
            f"transformers {first['hf']!r}."
        )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the f16 GGUF")
    parser.add_argument("--merged", type=Path, required=True, help="merged HF model folder (the reference)")
    parser.add_argument("--heldout", type=Path, required=True, help="JSONL of held-out prompts")
    parser.add_argument("--llama-bin", type=Path, required=True, help="the pinned llama.cpp bin folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-agreement", type=float, default=0.9)
    parser.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(check_threads(args.threads))
    for path in (args.gguf, args.merged, args.heldout):
        if not path.exists():
            raise InputError(f"{path}: not found.")
    record = check_generation(
        args.gguf, args.merged, args.heldout, args.llama_bin, args.threads,
        args.max_new_tokens, args.min_agreement, args.limit,
    )  # fmt: skip
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info("generation parity of %s written to %s", args.gguf, args.out)


if __name__ == "__main__":
    run(main)
