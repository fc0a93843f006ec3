"""Compute an importance matrix from the f16 GGUF on the fine-tune's own data plus general prose.

    python -m scripts.make_imatrix --imatrix-tool BUILD/bin/llama-imatrix --gguf results/demo/ggml-model-f16.gguf \
        --merged results/demo/merged --task-data data/demo_task/train.jsonl --prose-chars 100000 \
        --out results/demo/imatrix.gguf --threads 8

The calibration text is each task row as the model saw it in training (its
prompt rendered by the merged model's chat template, then its answer), followed
by prose: the calibration half of Python's documentation topics, never the half
that evaluation scores. The pinned `llama-imatrix` runs over it in chunks of
`--ctx-size` tokens (special tokens parsed, since the rendered prompts hold
them), showing progress in the log, and writes its GGUF-format matrix, which
becomes the output only when complete.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.common import (
    InputError,
    atomic_output,
    check_threads,
    load_gguf_vocab,
    provenance,
    run,
    write_provenance,
)
from scripts.task import prose, training_texts

log = logging.getLogger(__name__)

CALIBRATION = "calibration.txt"


def calibration_text(merged: Path, task_data: list[Path], prose_chars: int, extra: list[Path]) -> str:
    from transformers import AutoTokenizer

    parts = training_texts(AutoTokenizer.from_pretrained(merged), task_data) if task_data else []
    parts += [Path(p).read_text(encoding="utf-8") for p in extra]
    if prose_chars:
        parts.append(prose("calibration")[:prose_chars])
    return "\n\n".join(parts)


def count_tokens(gguf: Path, bin_dir: Path, text: str) -> int:
    return len(load_gguf_vocab(gguf, bin_dir).tokenize(text.encode("utf-8"), add_bos=True, special=True))


def make_imatrix(tool: Path, gguf: Path, text: str, out: Path, ctx_size: int, chunks: int, threads: int) -> dict:
    tokens = count_tokens(gguf, tool.parent, text)
    if tokens < 2 * ctx_size:
        raise InputError(
            f"{gguf}: the calibration text has {tokens} tokens, but llama-imatrix needs at least 2 × imatrix.ctx_size "
            f"= {2 * ctx_size}; add task data or prose (imatrix.prose_chars)."
        )
    used = tokens // ctx_size if chunks == 0 else min(chunks, tokens // ctx_size)
    log.info("calibration text: %d characters, %d tokens, %d chunks of %d", len(text), tokens, used, ctx_size)
    with atomic_output(out) as tmp:
        # the matrix records the text file's name as its dataset: run where that name is just CALIBRATION
        work = tmp.with_name(tmp.name + ".work")
        work.mkdir()
        (work / CALIBRATION).write_text(text, encoding="utf-8")
        # llama-imatrix saves to its output name as it goes: give it a scratch name
        scratch = work / "imatrix.gguf"
        cmd = [str(tool.resolve()), "-m", str(gguf.resolve()), "-f", CALIBRATION, "-o", str(scratch.resolve()),
               "-c", str(ctx_size), "--chunks", str(used), "-t", str(threads), "-tb", str(threads),
               "--parse-special", "--no-ppl", "--output-frequency", "1000000"]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=work)
        shutil.move(scratch, tmp)
        return {"tokens": tokens, "chunks": used, "ctx_size": ctx_size, "text_sha256": sha256_text(text)}


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imatrix-tool", type=Path, required=True, help="the pinned llama-imatrix")
    parser.add_argument("--gguf", type=Path, required=True, help="the f16 GGUF")
    parser.add_argument("--merged", type=Path, required=True, help="merged HF model folder (its chat template)")
    parser.add_argument("--task-data", type=Path, action="append", default=[], help="training data file; repeat")
    parser.add_argument("--text", type=Path, action="append", default=[], help="further calibration text file; repeat")
    parser.add_argument("--prose-chars", type=int, default=100_000, help="characters of general prose (0: none)")
    parser.add_argument("--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=0, help="chunks to process (0: all the text gives)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for path in [args.gguf, args.merged, *args.task_data, *args.text]:
        if not path.exists():
            raise InputError(f"{path}: not found.")
    text = calibration_text(args.merged, args.task_data, args.prose_chars, args.text)
    facts = make_imatrix(args.imatrix_tool, args.gguf, text, args.out, args.ctx_size, args.chunks, check_threads(args.threads))
    inputs = {"gguf": args.gguf, **{f"task_data{i}": p for i, p in enumerate(args.task_data, 1)}}
    inputs |= {f"text{i}": p for i, p in enumerate(args.text, 1)}
    record = provenance(args.out, inputs, step="make_imatrix", prose_chars=args.prose_chars, **facts)
    write_provenance(args.out, record)
    log.info("importance matrix written to %s", args.out)


if __name__ == "__main__":
    run(main)
