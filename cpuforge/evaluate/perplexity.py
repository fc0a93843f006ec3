"""Perplexity of one stage on the evaluation text, in llama-perplexity's windows.

A GGUF file goes through the pinned `llama-perplexity`. A HF folder goes through
torch in f32, streamed a decoder layer at a time (cpuforge.text.stream), on exactly
the tokens and windows llama-perplexity uses: the text is tokenized by the
pinned libllama with the f16 GGUF's vocabulary, cut into `ctx`-token windows
whose first token becomes BOS when the vocabulary adds one, and only the
second half of each window is scored (tools/perplexity), so the HF and GGUF
figures differ only by what the weights and kernels do.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output
from cpuforge.llama.runtime import LOAD_MODE, load_llama_cpp, run_llama_tool
from cpuforge.text.stream import next_token_nll
from cpuforge.text.task import as_text, read_heldout

log = logging.getLogger(__name__)


FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


PPL_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


TOO_SHORT = re.compile(r"you need at least (\d+) tokens .* context of (\d+)")


def llama_tokens(vocab: Path, bin_dir: Path, text: str) -> tuple[list[int], int | None]:
    """The text's tokens as llama-perplexity makes them, and the BOS id if the vocabulary adds one."""
    llama_cpp = load_llama_cpp(bin_dir)
    llm = llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False)
    # llama-perplexity: common_tokenize(ctx, text, add_special=true), special tokens not parsed
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    # the vocabulary adds BOS exactly when tokenizing nothing gives [BOS]
    bos = llm.tokenize(b"", add_bos=True, special=False)
    return tokens, bos[0] if bos else None


def windows(tokens: list[int], ctx: int, chunks: int, text: Path) -> int:
    """How many windows are scored; the text must hold two, as llama-perplexity demands."""
    if len(tokens) < 2 * ctx:
        raise InputError(f"{text}: {len(tokens)} tokens, fewer than the {2 * ctx} that a window of {ctx} needs.")
    return min(chunks, len(tokens) // ctx)


def perplexity_from_nll(nll: list[float]) -> tuple[float, float]:
    """exp(mean negative log-likelihood) and its standard error, as llama-perplexity computes them."""
    mean = math.fsum(nll) / len(nll)
    var = math.fsum(x * x for x in nll) / len(nll) - mean * mean
    ppl = math.exp(mean)
    return ppl, math.sqrt(max(var, 0.0) / (len(nll) - 1)) * ppl


def hf_window_nll(model_dir: Path, tokens: list[int], bos: int | None, ctx: int, n_windows: int) -> list[float]:
    """Negative log-likelihood of every scored token, every window streamed through the model together
    (cpuforge.text.stream: one decoder layer in memory at a time, in f32: half precision is slow on CPUs)."""
    windows = [tokens[i * ctx : (i + 1) * ctx] for i in range(n_windows)]
    for window in windows:
        if bos is not None:
            window[0] = bos
    nll = [x for scored in next_token_nll(model_dir, windows, ctx // 2) for x in scored]
    log.info("%d windows: perplexity %.4f", n_windows, math.exp(sum(nll) / len(nll)))
    return nll


def perplexity_hf(model_dir: Path, vocab: Path, bin_dir: Path, text: Path, ctx: int, chunks: int) -> dict:
    tokens, bos = llama_tokens(vocab, bin_dir, text.read_text(encoding="utf-8"))
    n_windows = windows(tokens, ctx, chunks, text)
    nll = hf_window_nll(model_dir, tokens, bos, ctx, n_windows)
    ppl, err = perplexity_from_nll(nll)
    return {"perplexity": ppl, "perplexity_err": err, "windows": n_windows, "scored_tokens": len(nll),
            "runtime": "torch f32, streamed"}  # fmt: skip


def perplexity_gguf(bin_dir: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int,
                    save_logits: Path | None) -> dict:  # fmt: skip
    # -b ctx: one window per batch, so every stage sees the same batches
    args = ["-m", gguf, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks, "-t", threads, *LOAD_MODE]
    if save_logits is None:
        return check_perplexity_output(run_llama_tool(bin_dir / "llama-perplexity", args), text)
    # llama-perplexity writes its logits file under the name it is given: give it the partial name
    with atomic_output(save_logits) as tmp:
        return check_perplexity_output(run_llama_tool(bin_dir / "llama-perplexity", [*args, "--kl-divergence-base", tmp]), text)


def scored_tokens(windows: int, ctx: int) -> int:
    """The tokens llama-perplexity scores over `windows` windows of `ctx`: each window's next-token predictions
    from its middle (position ctx // 2) to its end, ctx - 1 - ctx // 2 of them."""
    return windows * (ctx - 1 - ctx // 2)


def check_perplexity_output(out: str, text: Path) -> dict:
    if m := TOO_SHORT.search(out):
        raise InputError(f"{text}: fewer than the {m[1]} tokens that a window of {m[2]} needs.")
    final, chunks = FINAL.search(out), PPL_CHUNKS.search(out)
    if final is None or chunks is None:
        raise RuntimeError("llama-perplexity printed no final estimate; its output is in the log above.")
    n_windows, ctx = int(chunks[1]), int(chunks[2])
    return {"perplexity": float(final[1]), "perplexity_err": float(final[2]), "windows": n_windows,
            "scored_tokens": scored_tokens(n_windows, ctx), "runtime": "llama-perplexity"}  # fmt: skip


NUMBER = r"(-?[0-9.]+(?:e[-+]?\d+)?)"


FIGURES = {
    "perplexity": (rf"Mean PPL\(Q\)\s*:\s*{NUMBER}\s*±\s*{NUMBER}", 1.0),
    "f16_perplexity": (rf"Mean PPL\(base\)\s*:\s*{NUMBER}\s*±\s*{NUMBER}", 1.0),
    "kl_divergence": (rf"Mean\s+KLD:\s*{NUMBER}\s*±\s*{NUMBER}", 1.0),
    "kl_divergence_max": (rf"Maximum KLD:\s*{NUMBER}()", 1.0),
    "kl_divergence_p99": (rf"99\.0%\s+KLD:\s*{NUMBER}()", 1.0),
    # printed in percent; kept as a fraction
    "top1_agreement": (rf"Same top p:\s*{NUMBER}\s*±\s*{NUMBER} %", 0.01),
}


KL_CHUNKS = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)")


def parse_kl_output(out: str) -> dict:
    """The figures of llama-perplexity's KL divergence summary; each with its uncertainty where it has one."""
    figures = {}
    for name, (pattern, scale) in FIGURES.items():
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"llama-perplexity printed no {name.replace('_', ' ')}; its output is in the log above.")
        figures[name] = float(m[1]) * scale
        if m[2]:
            figures[f"{name}_err"] = float(m[2]) * scale
    if m := KL_CHUNKS.search(out):
        figures["windows"], ctx = int(m[1]), int(m[2])
        figures["scored_tokens"] = scored_tokens(figures["windows"], ctx)
    return figures


# one row of llama-perplexity's KL table: the windows so far, then each figure over them with its uncertainty
# (perplexity, ln(PPL(Q)/PPL(base)), KL divergence, RMS of the change in p in %, same top p in %)
KL_ROW = re.compile(rf"^\s*(\d+)\s+{NUMBER} ± \s*{NUMBER}\s+{NUMBER} ± \s*{NUMBER}\s+{NUMBER} ± \s*{NUMBER}"
                    rf"\s+{NUMBER} ± \s*{NUMBER} %\s+{NUMBER} ± \s*{NUMBER} %\s*$")  # fmt: skip


def running_kl(line: str, ctx: int) -> dict | None:
    """The figures over the windows so far, from one row of llama-perplexity's KL table (None for any other
    line): the summary's names, without its maximum and 99th percentile."""
    m = KL_ROW.match(line)
    if m is None:
        return None
    windows, perplexity = int(m[1]), float(m[2])
    return {"perplexity": perplexity, "perplexity_err": float(m[3]),
            "f16_perplexity": perplexity / math.exp(float(m[4])), "kl_divergence": float(m[6]),
            "kl_divergence_err": float(m[7]), "top1_agreement": float(m[10]) / 100,
            "top1_agreement_err": float(m[11]) / 100, "windows": windows,
            "scored_tokens": scored_tokens(windows, ctx)}  # fmt: skip


def ppl_increase_pct(figures: dict) -> float:
    """A KL run's perplexity over the f16 GGUF's, as an increase in percent."""
    return (figures["perplexity"] / figures["f16_perplexity"] - 1) * 100


def kl_divergence(bin_dir: Path, gguf: Path, logits: Path, ctx: int, threads: int, loras: list[Path] = (),
                  stop: Callable[[dict], object] | None = None) -> dict:  # fmt: skip
    """`gguf` against the saved f16 log-probabilities; with `loras`, GGUF LoRA adapters applied to it at run
    time (each at scale 1, on its own alpha / r), as llama-server's --lora applies them. With `stop`, the run
    ends after the first window before its last where `stop(the figures so far)` says why (anything true), and
    those figures are returned, with `stopped_early`: what it said."""
    args = ["-m", gguf, "--kl-divergence-base", logits, "--kl-divergence", "-c", ctx, "-b", ctx, "-t", threads,
            *LOAD_MODE]  # fmt: skip
    for lora in loras:
        args += ["--lora", lora]
    rows: list[dict] = []
    windows = [0]  # the run's, from its "computing over" line: at the last one, its summary says it all

    def decided(line: str) -> bool:
        if m := KL_CHUNKS.search(line):
            windows[0] = int(m[1])
        row = running_kl(line, ctx)
        why = None if row is None or row["windows"] >= windows[0] else stop(row)
        if why:
            rows.append({**row, "stopped_early": why})
        return bool(why)

    out = run_llama_tool(bin_dir / "llama-perplexity", args, decided if stop else None)
    return rows[0] if rows else parse_kl_output(out)


LOGITS_HEAD = struct.Struct("<8sIii")  # llama-perplexity --save-logits: "_logits_", n_ctx, n_vocab, n_chunk


def logits_window_bytes(ctx: int, vocab: int) -> int:
    """One window's log-probabilities in llama-perplexity's --save-logits file: for every scored position the
    vocabulary's, as uint16 (an even count, plus 4 for their scale)."""
    return (ctx - 1 - ctx // 2) * (2 * ((vocab + 1) // 2) + 4) * 2


def logits_bytes(ctx: int, vocab: int, windows: int) -> int:
    """The whole file: its head, every window's tokens, then every window's log-probabilities."""
    return LOGITS_HEAD.size + 4 * ctx * windows + windows * logits_window_bytes(ctx, vocab)


def spread_order(n: int) -> list[int]:
    """Windows 0..n-1 in the order of the van der Corput sequence (of 16: 0, 8, 4, 12, 2, 10, …): every first k
    of them spread evenly over the text, so that the figures over them stand for the whole run's."""
    bits = max(1, (n - 1).bit_length())
    order = [(int(f"{j:0{bits}b}"[::-1], 2) * n) >> bits for j in range(1 << bits)]
    return list(dict.fromkeys(order))


def spread_logits(logits: Path, out: Path) -> None:
    """`logits` (llama-perplexity --save-logits) copied to `out` with its windows in spread_order: a KL run over
    it scores the same windows, so its figures over all of them are the same, and its figures so far, after
    each window, are over windows spread across the whole text rather than its beginning."""
    with open(logits, "rb") as f:
        head = f.read(LOGITS_HEAD.size)
        magic, ctx, vocab, n = LOGITS_HEAD.unpack(head) if len(head) == LOGITS_HEAD.size else (b"", 0, 0, 0)
        block, base = logits_window_bytes(ctx, vocab), LOGITS_HEAD.size + 4 * ctx * n  # tokens, then blocks
        if magic != b"_logits_" or n < 1 or logits.stat().st_size != logits_bytes(ctx, vocab, n):
            raise InputError(f"{logits}: not a whole llama-perplexity --save-logits file; make it again.")
        tokens = np.fromfile(f, dtype="<i4", count=ctx * n).reshape(n, ctx)
        order = spread_order(n)
        with atomic_output(out) as tmp, open(tmp, "wb") as w:
            w.write(head)
            tokens[order].tofile(w)
            for window in order:
                f.seek(base + window * block)
                w.write(f.read(block))


PYDOC = "pydoc_topics"


def read_text(text: str) -> str:
    """The evaluation prose: Python's documentation topics for `pydoc_topics`, else a UTF-8 file."""
    if text == PYDOC:
        from pydoc_data.topics import topics

        # sorted, so the text is the same whatever order the module keeps its dict in
        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    try:
        return Path(text).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{text}: text file not found.") from None
    except UnicodeDecodeError:
        raise InputError(f"{text}: not a UTF-8 text file.") from None


def eval_text(text: str, task: Path | None) -> str:
    parts = []
    if task is not None:
        parts.append(as_text(read_heldout(task)))
    parts.append(read_text(text))
    return "\n\n".join(parts) + "\n"
