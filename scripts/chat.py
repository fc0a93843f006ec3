"""Example:

    python -m scripts.chat results/demo/ggml-model-q4_0.gguf
    python -m scripts.chat results/demo/ggml-model-q4_0.gguf --prompt "..."   # one answer, then exit
    python -m scripts.chat --hf results/demo/merged --num-beams 4             # before converting
    python -m scripts.chat results/demo/base-q4_0.gguf --lora results/demo/adapters/1-demo.gguf   # runtime LoRA

The step is described once, in cpuforge.serve.chat's docstring, which --help shows first.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cpuforge.serve.chat import answer, load_generation, open_chat, repl, write_stdout
from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.llama.runtime import MAX_DEFAULT_CTX, default_thread_counts
from cpuforge.serve.adapters import parse_scaled_file
import cpuforge.serve.chat as library


def main() -> None:
    parser = argparse.ArgumentParser(
        description=library.__doc__, epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", type=Path, help="GGUF file")
    parser.add_argument("--hf", type=Path, metavar="FOLDER", help="merged HF model folder instead of a GGUF")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--threads", type=int, help="generation threads (default: the eval report's recommendation)")
    parser.add_argument("--threads-batch", type=int, help="prompt-processing threads (GGUF; default: likewise)")
    parser.add_argument(
        "--ctx-size", type=int, default=0, help=f"GGUF context; default the model's, ≤{MAX_DEFAULT_CTX}"
    )
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="apply this GGUF LoRA adapter to the GGUF at run time; repeat to stack")  # fmt: skip
    parser.add_argument("--tokenizer", type=Path, metavar="FOLDER",
                        help="HF folder whose tokenizer and template build a GGUF's prompts (default: results/{model}/merged)")
    parser.add_argument("--generation-config", type=Path, help="JSON with HF GenerationConfig keys")
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--num-beams", type=int, help="beam search (HF only), e.g. 4")
    parser.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    if (args.model is None) == (args.hf is None):
        parser.error("give a GGUF file or --hf FOLDER, not both")
    model = args.hf or args.model
    gen = load_generation(
        args.generation_config, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, early_stopping=args.early_stopping, seed=args.seed,
    )  # fmt: skip
    if args.model is not None and gen.num_beams > 1:
        raise InputError("beam search runs only on the HF model (--hf); llama.cpp decodes one sequence.")
    threads, threads_batch = default_thread_counts(model, args.threads, args.threads_batch)
    # Ctrl-C ends the chat even when it was started with SIGINT ignored, as a background job of a
    # script is (Python keeps an inherited SIG_IGN and then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    loras = [parse_scaled_file(a) for a in args.lora]
    chat = open_chat(model, args.hf is not None, threads, args.ctx_size, args.llama_bin, loras, args.tokenizer,
                     threads_batch)  # fmt: skip
    try:
        if args.prompt is not None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            answer(chat, [*messages, {"role": "user", "content": args.prompt}], gen, write_stdout)
            write_stdout("\n")
        else:
            import readline  # noqa: F401  (line editing and history for input())

            repl(chat, gen, args.system)
    except KeyboardInterrupt:
        write_stdout("\n")
        sys.exit(130)


if __name__ == "__main__":
    run(main)
