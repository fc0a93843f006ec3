"""Perplexity of one stage on the evaluation text, in llama-perplexity's windows.

    python -m scripts.eval_perplexity --gguf ggml-model-f16.gguf --llama-bin BIN \
        --text eval_text.txt --ctx-size 512 --chunks 16 --stage f16 --save-logits f16.kld --out f16.json
    python -m scripts.eval_perplexity --hf results/m/merged --vocab ggml-model-f16.gguf \
        --llama-bin BIN --text eval_text.txt --ctx-size 512 --chunks 16 --stage merged --out merged.json

A GGUF file goes through the pinned `llama-perplexity`. A HF folder goes through
torch in f32, on exactly the tokens and windows llama-perplexity uses: the text
is tokenized by the pinned libllama with the f16 GGUF's vocabulary, cut into
`--ctx-size`-token windows whose first token becomes BOS when the vocabulary adds
one, and only the second half of each window is scored (tools/perplexity), so
the HF and GGUF figures differ only by what the weights and kernels do.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpuforge.cli import add_flags, run
from cpuforge.llama.runtime import check_threads
from cpuforge.io.files import sha256_file, write_json
from cpuforge.evaluate.perplexity import perplexity_gguf, perplexity_hf

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--gguf", type=Path, metavar="FILE", help="GGUF file, through the pinned llama-perplexity")
    model.add_argument("--hf", type=Path, metavar="FOLDER", help="HF model folder, through torch in f32")
    add_flags(parser, "llama-bin", "ctx-size", "out", "threads", ctx_size={"help": "window length in tokens"})
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--chunks", type=int, default=16, help="windows to score at most")
    parser.add_argument("--stage", required=True, help="stage name written into the result")
    parser.add_argument("--save-logits", type=Path, help="GGUF: also write the log-probabilities for --kl-divergence")
    parser.add_argument("--vocab", type=Path, help="HF: the GGUF whose vocabulary tokenizes the text (the f16 GGUF)")
    args = parser.parse_args()
    threads = check_threads(args.threads)
    if args.hf is not None:
        if args.vocab is None:
            parser.error("a HF folder needs --vocab")
        import torch

        torch.set_num_threads(threads)
        result = perplexity_hf(args.hf, args.vocab, args.llama_bin, args.text, args.ctx_size, args.chunks)
    else:
        result = perplexity_gguf(args.llama_bin, args.gguf, args.text, args.ctx_size, args.chunks, threads,
                                 args.save_logits)  # fmt: skip
    result = {"stage": args.stage, "ctx": args.ctx_size, "text_sha256": sha256_file(args.text), **result}
    write_json(args.out, result)
    log.info("%s perplexity %.4f +/- %.4f over %d windows", args.stage, result["perplexity"],
             result["perplexity_err"], result["windows"])  # fmt: skip


if __name__ == "__main__":
    run(main)
