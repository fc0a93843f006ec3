"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

    python -m scripts.eval_task --model results/m/merged --tokenizer results/m/merged \
        --task data/demo_task/heldout.jsonl --stage merged --out merged.json
    python -m scripts.eval_task --model ggml-model-q4_0.gguf --tokenizer results/m/merged \
        --task data/demo_task/heldout.jsonl --llama-lib BIN/libllama.so --stage q4_0 --out q4_0.json

A HF folder answers through transformers (scripts/task.py: the chat template of
the merged model's tokenizer, do_sample=False). A GGUF file answers through
llama-cpp-python bound to the pinned libllama, with the chat template stored in
the GGUF, rendered and tokenized as llama-cpp-python's chat handler does, and
greedy sampling. A model without a chat template is prompted by plain completion
in both. Every stage must see the same prompt: each GGUF prompt's token
ids are checked against transformers' ids before any answer is generated, and a
difference stops the step with the row and the first differing position.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scripts.common import InputError, check_threads, load_llama_cpp, run, write_json
from scripts.task import (
    answer,
    exact_match,
    gguf_greedy_answers,
    gguf_prompt_ids,
    greedy_answers,
    prompt_ids,
    read_heldout,
)

log = logging.getLogger(__name__)


def hf_prompts(tokenizer_dir: Path, rows: list[dict]) -> tuple[object, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer, [prompt_ids(tokenizer, r) for r in rows]


def check_same_prompts(gguf: Path, tokenizer_dir: Path, gguf_ids: list[list[int]], hf_ids: list[list[int]]) -> None:
    for number, (ours, theirs) in enumerate(zip(gguf_ids, hf_ids, strict=True), 1):
        if ours != theirs:
            pairs = enumerate(zip(ours, theirs, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(theirs)))
            raise InputError(
                f"{gguf}: held-out row {number} renders through the GGUF's chat template to {len(ours)} tokens that "
                f"differ from the {len(theirs)} of transformers' template of {tokenizer_dir} at token {at}, so the "
                "stages would not see the same prompt."
            )


def answers_gguf(gguf: Path, llama_lib: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int,
                 threads: int) -> list[str]:  # fmt: skip
    llama_cpp = load_llama_cpp(llama_lib.parent)
    _, hf_ids = hf_prompts(tokenizer_dir, rows)
    n_ctx = max(map(len, hf_ids)) + max_new_tokens
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    check_same_prompts(gguf, tokenizer_dir, [gguf_prompt_ids(llm, r) for r in rows], hf_ids)
    log.info("all %d GGUF prompts equal transformers' token for token", len(rows))
    return gguf_greedy_answers(llm, rows, max_new_tokens)


def answers_hf(model_dir: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, _ = hf_prompts(tokenizer_dir, rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="GGUF file or HF model folder")
    parser.add_argument("--tokenizer", type=Path, required=True, help="HF folder whose template builds prompts")
    parser.add_argument("--task", type=Path, required=True, help="the task's held-out JSONL")
    parser.add_argument("--llama-lib", type=Path, help="the pinned libllama.so (GGUF files)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = check_threads(args.threads)
    rows = read_heldout(args.task)
    if args.model.is_dir():
        import torch

        torch.set_num_threads(threads)
        answers = answers_hf(args.model, args.tokenizer, rows, args.max_new_tokens)
        runtime = "transformers f32"
    else:
        if args.llama_lib is None:
            parser.error("a GGUF file needs --llama-lib")
        answers = answers_gguf(args.model, args.llama_lib, args.tokenizer, rows, args.max_new_tokens, threads)
        runtime = "llama-cpp-python"
    accuracy = exact_match(answers, rows)
    correct = sum(a == answer(r) for a, r in zip(answers, rows, strict=True))
    write_json(args.out, {"stage": args.stage, "accuracy": accuracy, "correct": correct, "rows": len(rows),
                          "runtime": runtime, "answers": answers})  # fmt: skip
    log.info("%s: exact match %.3f (%d/%d)", args.stage, accuracy, correct, len(rows))


if __name__ == "__main__":
    run(main)
