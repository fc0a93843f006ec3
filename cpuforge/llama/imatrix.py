"""Compute an importance matrix from the f16 GGUF on the fine-tune's own data plus general prose.

The calibration text is each task row as the model saw it in training (its
prompt rendered by the merged model's chat template, then its answer), followed
by prose: the calibration half of Python's documentation topics, never the half
that evaluation scores. The pinned `llama-imatrix` runs over it in chunks of
`--ctx-size` tokens (special tokens parsed, since the rendered prompts hold
them), showing progress in the log, and writes its GGUF-format matrix, which
becomes the output only when complete.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.llama.runtime import LOAD_MODE, load_gguf_vocab
from cpuforge.text.task import prose, training_texts

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


def make_imatrix(bin_dir: Path, gguf: Path, text: str, out: Path, ctx_size: int, chunks: int, threads: int) -> dict:
    tokens = count_tokens(gguf, bin_dir, text)
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
        # llama-imatrix saves to its output name as it goes: give it a scratch name. Its perplexity is not
        # wanted, but only with it does it log each chunk as it ends ("[n]ppl" after "computing over N chunks")
        scratch = work / "imatrix.gguf"
        cmd = [str((bin_dir / "llama-imatrix").resolve()), "-m", str(gguf.resolve()), "-f", CALIBRATION,
               "-o", str(scratch.resolve()),
               "-c", str(ctx_size), "--chunks", str(used), "-t", str(threads), "-tb", str(threads),
               "--parse-special", "--output-frequency", "1000000", *LOAD_MODE]  # fmt: skip
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=work)
        shutil.move(scratch, tmp)
        return {"tokens": tokens, "chunks": used, "ctx_size": ctx_size, "text_sha256": sha256_text(text)}


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()
