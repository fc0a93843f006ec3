"""Perplexity of one stage on the evaluation text, in llama-perplexity's windows.

    python -m scripts.eval_perplexity --model ggml-model-f16.gguf --perplexity BIN/llama-perplexity \
        --text eval_text.txt --ctx 512 --chunks 16 --stage f16 --save-logits f16.kld --out f16.json
    python -m scripts.eval_perplexity --model results/m/merged --vocab ggml-model-f16.gguf \
        --llama-lib BIN/libllama.so --text eval_text.txt --ctx 512 --chunks 16 --stage merged --out merged.json

A GGUF file goes through the pinned `llama-perplexity`. A HF folder goes through
torch in f32, on exactly the tokens and windows llama-perplexity uses: the text
is tokenized by the pinned libllama with the f16 GGUF's vocabulary, cut into
`--ctx`-token windows whose first token becomes BOS when the vocabulary adds
one, and only the second half of each window is scored (tools/perplexity), so
the HF and GGUF figures differ only by what the weights and kernels do.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path

from scripts.common import (
    InputError,
    atomic_output,
    check_threads,
    load_llama_cpp,
    run,
    run_llama_tool,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
TOO_SHORT = re.compile(r"you need at least (\d+) tokens .* context of (\d+)")


def llama_tokens(vocab: Path, llama_lib: Path, text: str) -> tuple[list[int], int | None]:
    """The text's tokens as llama-perplexity makes them, and the BOS id if the vocabulary adds one."""
    llama_cpp = load_llama_cpp(llama_lib.parent)
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
    """Negative log-likelihood of every scored token; the model runs in f32 (half precision is slow on CPUs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    first = ctx // 2
    nll = []
    for i in range(n_windows):
        window = tokens[i * ctx : (i + 1) * ctx]
        if bos is not None:
            window[0] = bos
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].float()
        logp = torch.log_softmax(logits[first : ctx - 1], dim=-1)
        targets = torch.tensor(window[first + 1 : ctx])
        nll += (-logp.gather(1, targets[:, None])[:, 0]).double().tolist()
        log.info("window %d/%d: running perplexity %.4f", i + 1, n_windows, math.exp(sum(nll) / len(nll)))
    return nll


def perplexity_hf(model_dir: Path, vocab: Path, llama_lib: Path, text: Path, ctx: int, chunks: int) -> dict:
    tokens, bos = llama_tokens(vocab, llama_lib, text.read_text(encoding="utf-8"))
    n_windows = windows(tokens, ctx, chunks, text)
    nll = hf_window_nll(model_dir, tokens, bos, ctx, n_windows)
    ppl, err = perplexity_from_nll(nll)
    return {"perplexity": ppl, "perplexity_err": err, "windows": n_windows, "scored_tokens": len(nll),
            "runtime": "torch f32"}  # fmt: skip


def perplexity_gguf(perplexity: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int,
                    save_logits: Path | None) -> dict:  # fmt: skip
    # -b ctx: one window per batch, so every stage sees the same batches
    args = ["-m", gguf, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks, "-t", threads]
    if save_logits is None:
        return check_perplexity_output(run_llama_tool(perplexity, args), text)
    # llama-perplexity writes its logits file under the name it is given: give it the partial name
    with atomic_output(save_logits) as tmp:
        return check_perplexity_output(run_llama_tool(perplexity, [*args, "--kl-divergence-base", tmp]), text)


def check_perplexity_output(out: str, text: Path) -> dict:
    if m := TOO_SHORT.search(out):
        raise InputError(f"{text}: fewer than the {m[1]} tokens that a window of {m[2]} needs.")
    final, chunks = FINAL.search(out), CHUNKS.search(out)
    if final is None or chunks is None:
        raise RuntimeError("llama-perplexity printed no final estimate; its output is in the log above.")
    n_windows, ctx = int(chunks[1]), int(chunks[2])
    return {"perplexity": float(final[1]), "perplexity_err": float(final[2]), "windows": n_windows,
            "scored_tokens": n_windows * (ctx - 1 - ctx // 2), "runtime": "llama-perplexity"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="GGUF file or HF model folder")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--ctx", type=int, default=512, help="window length in tokens")
    parser.add_argument("--chunks", type=int, default=16, help="windows to score at most")
    parser.add_argument("--stage", required=True, help="stage name written into the result")
    parser.add_argument("--out", type=Path, required=True, help="JSON result")
    parser.add_argument("--threads", type=int, default=1)
    gguf = parser.add_argument_group("GGUF files")
    gguf.add_argument("--perplexity", type=Path, help="the pinned llama-perplexity")
    gguf.add_argument("--save-logits", type=Path, help="also write the log-probabilities for --kl-divergence")
    hf = parser.add_argument_group("HF folders")
    hf.add_argument("--vocab", type=Path, help="GGUF whose vocabulary tokenizes the text (the f16 GGUF)")
    hf.add_argument("--llama-lib", type=Path, help="the pinned libllama.so, to tokenize as llama-perplexity does")
    args = parser.parse_args()
    threads = check_threads(args.threads)
    if args.model.is_dir():
        if args.vocab is None or args.llama_lib is None:
            parser.error("a HF folder needs --vocab and --llama-lib")
        import torch

        torch.set_num_threads(threads)
        result = perplexity_hf(args.model, args.vocab, args.llama_lib, args.text, args.ctx, args.chunks)
    else:
        if args.perplexity is None:
            parser.error("a GGUF file needs --perplexity")
        result = perplexity_gguf(args.perplexity, args.model, args.text, args.ctx, args.chunks, threads,
                                 args.save_logits)  # fmt: skip
    result = {"stage": args.stage, "ctx": args.ctx, "text_sha256": sha256_file(args.text), **result}
    write_json(args.out, result)
    log.info("%s perplexity %.4f +/- %.4f over %d windows", args.stage, result["perplexity"],
             result["perplexity_err"], result["windows"])  # fmt: skip


if __name__ == "__main__":
    run(main)
