"""How far a quant's next-token distributions are from the f16 GGUF's, with the pinned llama-perplexity.

    python -m scripts.eval_kl_divergence --gguf ggml-model-q4_0.gguf --llama-bin BIN \
        --logits f16-logits.kld --ctx-size 512 --stage q4_0 --out q4_0.json

`llama-perplexity --kl-divergence` reads the tokens and f16 log-probabilities
that eval_perplexity saved and scores the quant on the same windows: the mean
KL divergence KL(f16 || quant) per token, how often both pick the same top-1
token, and the quant's own perplexity on those tokens. With --lora, the GGUF is an
unmerged base and the adapters are applied to it at run time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import write_json
from cpuforge.evaluate.perplexity import kl_divergence

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, "gguf", "llama-bin", "ctx-size", "out", "threads", gguf={"help": "quantized GGUF"},
              ctx_size={"help": "window length the logits were made with"})  # fmt: skip
    parser.add_argument("--logits", type=Path, required=True, help="f16 log-probs (eval_perplexity --save-logits)")
    add_flags(parser, "lora")
    parser.add_argument("--stage", required=True)
    args = parser.parse_args()
    result = kl_divergence(args.llama_bin, args.gguf, args.logits, args.ctx_size, check_threads(args.threads),
                           args.lora)  # fmt: skip
    write_json(args.out, {"stage": args.stage, "ctx": args.ctx_size, "runtime": "llama-perplexity",
                          "loras": [str(a) for a in args.lora], **result})  # fmt: skip
    log.info("%s: mean KL divergence %.5f, top-1 agreement %.3f, perplexity %.4f", args.stage,
             result["kl_divergence"], result["top1_agreement"], result["perplexity"])  # fmt: skip


if __name__ == "__main__":
    run(main)
