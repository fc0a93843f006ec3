"""Task accuracy of one stage: greedy answers to the task's held-out rows, scored by exact match.

    python -m scripts.eval_task --hf results/m/merged --merged results/m/merged \
        --heldout data/demo_task/heldout.jsonl --stage merged --out merged.json
    python -m scripts.eval_task --gguf ggml-model-q4_0.gguf --merged results/m/merged \
        --heldout data/demo_task/heldout.jsonl --llama-bin BIN --stage q4_0 --out q4_0.json

Every stage reads the same prompt, as training saw it: the token ids of
transformers' `apply_chat_template` on the merged model's tokenizer
(cpuforge.text.prompt; plain completion for a model without a chat template). A HF
folder is scored by teacher forcing, in one pass streamed a decoder layer at a
time (cpuforge.evaluate.task.answers_hf): a row is right when the model's greedy
choice is the answer's token at every answer position and a stop token after
it, which is greedy decoding's exact match (do_sample=False); its `answers` are
the task's where right, else written up to the first token that differs. A GGUF
file answers through llama-cpp-python bound to the pinned libllama, fed those
ids as they are (never the GGUF's template re-tokenized by llama.cpp, which
differs for sentencepiece vocabularies), greedily; its answers are kept as token ids
too (`answer_ids`), which the report and the quant search compare every quant's with.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.evaluate.task import answers_gguf, answers_hf
from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import write_json
from cpuforge.text.task import answer, read_heldout

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--gguf", type=Path, metavar="FILE", help="GGUF file, through llama-cpp-python")
    model.add_argument("--hf", type=Path, metavar="FOLDER", help="HF model folder, through transformers")
    add_flags(parser, "merged", "heldout", "llama-bin", "out", "threads", heldout={"required": True},
              merged={"help": "merged HF model folder, whose tokenizer and template build the prompts"},
              llama_bin={"required": False, "help": "the pinned llama.cpp bin folder (GGUF files)"})  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48)
    add_flags(parser, "lora")
    parser.add_argument("--stage", required=True)
    args = parser.parse_args()
    threads = check_threads(args.threads)
    rows = read_heldout(args.heldout)
    if args.hf is not None and args.lora:
        parser.error("--lora applies GGUF LoRAs to a GGUF (--gguf); a HF folder is merged already")
    if args.hf is not None:
        import torch

        torch.set_num_threads(threads)
        answers, right = answers_hf(args.hf, args.merged, rows, args.max_new_tokens)
        runtime = "transformers f32, streamed, teacher-forced"
    else:
        if args.llama_bin is None:
            parser.error("a GGUF file needs --llama-bin")
        answers, ids = answers_gguf(args.gguf, args.llama_bin, args.merged, rows, args.max_new_tokens, threads,
                                    args.lora)  # fmt: skip
        right = [a == answer(r) for a, r in zip(answers, rows, strict=True)]
        runtime = "llama-cpp-python" + (" + runtime LoRA" if args.lora else "")
    correct = sum(right)
    write_json(args.out, {"stage": args.stage, "accuracy": correct / len(rows), "correct": correct, "rows": len(rows),
                          "runtime": runtime, "answers": answers, "right": right,
                          **({} if args.hf else {"answer_ids": ids})})  # fmt: skip
    log.info("%s: exact match %.3f (%d/%d)", args.stage, correct / len(rows), correct, len(rows))


if __name__ == "__main__":
    run(main)
