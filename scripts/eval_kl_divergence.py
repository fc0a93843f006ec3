"""How far a quant's next-token distributions are from the f16 GGUF's, with the pinned llama-perplexity.

    python -m scripts.eval_kl_divergence --model ggml-model-q4_0.gguf --perplexity BIN/llama-perplexity \
        --logits f16-logits.kld --ctx 512 --stage q4_0 --out q4_0.json

`llama-perplexity --kl-divergence` reads the tokens and f16 log-probabilities
that eval_perplexity saved and scores the quant on the same windows: the mean
KL divergence KL(f16 || quant) per token, how often both pick the same top-1
token, and the quant's own perplexity on those tokens.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from scripts.common import check_threads, run, run_llama_tool, write_json

log = logging.getLogger(__name__)

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
CHUNKS = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)")


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
    if m := CHUNKS.search(out):
        figures["windows"], ctx = int(m[1]), int(m[2])
        figures["scored_tokens"] = figures["windows"] * (ctx - 1 - ctx // 2)
    return figures


def kl_divergence(perplexity: Path, gguf: Path, logits: Path, ctx: int, threads: int) -> dict:
    args = ["-m", gguf, "--kl-divergence-base", logits, "--kl-divergence", "-c", ctx, "-b", ctx, "-t", threads]
    return parse_kl_output(run_llama_tool(perplexity, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="quantized GGUF")
    parser.add_argument("--perplexity", type=Path, required=True, help="the pinned llama-perplexity")
    parser.add_argument("--logits", type=Path, required=True, help="f16 log-probs (eval_perplexity --save-logits)")
    parser.add_argument("--ctx", type=int, default=512, help="window length the logits were made with")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    result = kl_divergence(args.perplexity, args.model, args.logits, args.ctx, check_threads(args.threads))
    write_json(args.out, {"stage": args.stage, "ctx": args.ctx, "runtime": "llama-perplexity", **result})
    log.info("%s: mean KL divergence %.5f, top-1 agreement %.3f, perplexity %.4f", args.stage,
             result["kl_divergence"], result["top1_agreement"], result["perplexity"])  # fmt: skip


if __name__ == "__main__":
    run(main)
