"""Serve a GGUF model over an OpenAI-compatible HTTP API, on CPU, with a chat page in the browser.

    python -m scripts.serve results/demo/ggml-model-q4_0.gguf [--host 127.0.0.1] [--port 8080] [--api-key KEY]
    python -m scripts.serve results/demo/base-q4_0.gguf --lora task=results/demo/adapters/1-demo.gguf[:SCALE] ...

Endpoints: POST /v1/chat/completions and /v1/completions (with "stream": true too),
GET /v1/models, GET /health, GET /metrics (Prometheus text), and llama-server's web UI at /
(--no-webui turns it off). The model is named `{model}-{qtype}` after its results/ path
(`demo-q4_0`), or --name; with --lora NAME=FILE, `{model}-{qtype}+NAME` is the base with that
GGUF LoRA applied, picked per request by its `model` field (cpuforge/serve/adapters.py).

The pinned build's llama-server does the work: C++ end to end, continuous batching over
--parallel slots. It listens on a Unix socket in a private folder, so nothing but this
process reaches it (cpuforge/serve/engine.py). A chat request is rendered and tokenized
here, with the merged model's template and tokenizer (results/{model}/merged beside the
GGUF, or --tokenizer FOLDER), and llama-server is sent those token ids
(cpuforge/serve/completions.py), so the model reads the ids it was trained on; without a
merged folder, llama-server's own template path. This process is a thin proxy in front of
it that answers what llama-server gets wrong for an OpenAI client: malformed JSON
(llama-server says 500), a model name it does not serve (llama-server ignores the name) and
a wrong API key (checked here, so a bad request never reaches the model); everything else,
errors included (a prompt longer than the context is a 400), passes through byte for byte,
streamed as it comes (cpuforge/serve/app.py and relay.py).

The proxy also keeps llama-server alive: /health says `loading`, `ok` or `unavailable` (503 for
the two not ok), a request in flight when llama-server dies gets a 503 in the OpenAI error shape,
and llama-server is restarted (up to --restarts times in a row, waiting 1, 2, 4 … s); when it
cannot be (the model no longer loads), the proxy exits with code 1 and one sentence. SIGTERM or
SIGINT stops taking requests, lets those in flight finish for up to --drain-timeout seconds,
then stops both processes (cpuforge/serve/server.py).
--threads (generation) and --threads-batch (prompt processing) default to `recommended_threads`
and `recommended_threads_batch` in the eval report (results/{model}/report/metrics.json) when
there is one, else the physical core count; --speculation to the draftless speculative decoding
setting that report found faster on the model's own task with every answer the same, if any.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cpuforge.cli import run
from cpuforge.serve.speculation import AUTO, SETTINGS
from cpuforge.llama.runtime import MAX_DEFAULT_CTX
from cpuforge.serve.engine import RESTARTS, EngineFailed
from cpuforge.serve.server import DRAIN_TIMEOUT, Settings, serve

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="GGUF file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port (logged)")
    parser.add_argument("--api-key", default=os.environ.get("CPUFORGE_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $CPUFORGE_API_KEY, else no key)")  # fmt: skip
    parser.add_argument("--name", help="model id in the API (default: {model}-{qtype})")
    parser.add_argument("--threads", type=int, help="generation threads (default: the eval report's recommendation)")
    parser.add_argument("--threads-batch", type=int, help="prompt-processing threads (default: likewise)")
    parser.add_argument(
        "--ctx-size", type=int, default=0, help=f"context of each request; default the model's, ≤{MAX_DEFAULT_CTX}"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=4,
        help="requests decoded together (default 4); the KV cache holds parallel × ctx-size tokens",
    )
    parser.add_argument("--no-webui", action="store_true", help="no chat page at /: the API only")
    parser.add_argument("--speculation", default=AUTO, choices=[AUTO, *SETTINGS],
                        help="draftless speculative decoding: auto (default) turns on the setting the eval report "
                             "found faster on this model's task with the same answers, none turns it off")  # fmt: skip
    parser.add_argument("--restarts", type=int, default=RESTARTS,
                        help=f"restarts in a row of a llama-server that died before giving up (default {RESTARTS})")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT,
                        help=f"seconds that requests in flight get to finish on SIGTERM (default {DRAIN_TIMEOUT:g})")  # fmt: skip
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=FILE[:SCALE]",
                        help="serve BASE+NAME: the model with this GGUF LoRA; repeat (a NAME again stacks)")  # fmt: skip
    parser.add_argument("--tokenizer", type=Path, metavar="FOLDER",
                        help="HF folder whose tokenizer and template build chat prompts "
                             "(default: results/{model}/merged)")  # fmt: skip
    args = parser.parse_args()
    try:
        serve(Settings(
            args.model, llama_bin=args.llama_bin, host=args.host, port=args.port, api_key=args.api_key or None,
            name=args.name, threads=args.threads, threads_batch=args.threads_batch, ctx_size=args.ctx_size,
            parallel=args.parallel, loras=args.lora, webui=not args.no_webui, restarts=args.restarts,
            drain_timeout=args.drain_timeout, tokenizer=args.tokenizer, speculation=args.speculation,
        ))  # fmt: skip
    except EngineFailed as e:
        # for a supervisor (systemd, SLURM): the server is gone, and why, in one line
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    run(main)
