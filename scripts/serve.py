"""Serve a GGUF model over an OpenAI-compatible HTTP API, on CPU.

    python -m scripts.serve results/demo/ggml-model-q4_0.gguf [--host 127.0.0.1] [--port 8080] [--api-key KEY]

Endpoints: POST /v1/chat/completions and /v1/completions (with "stream": true too),
GET /v1/models, GET /health. The model is named `{model}-{qtype}` after its results/ path
(`demo-q4_0`), or --name.

The pinned build's llama-server does the work: C++ end to end, continuous batching over
--parallel slots, the model's chat template. It listens on a Unix socket in a private
folder, so nothing but this process reaches it. This process is a thin proxy in front of
it that answers what llama-server gets wrong for an OpenAI client: malformed JSON (llama-server
says 500), a model name it does not serve (llama-server ignores the name) and a wrong API key
(checked here, so a bad request never reaches the model); everything else, errors included
(a prompt longer than the context is a 400), passes through byte for byte, streamed as it comes.
--threads (generation) and --threads-batch (prompt processing) default to `recommended_threads`
and `recommended_threads_batch` in the eval report (results/{model}/report/metrics.json) when
there is one, else the physical core count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.llama import MAX_DEFAULT_CTX, default_thread_counts, gguf_context_length
from cpuforge.paths import default_llama_bin, model_name

log = logging.getLogger(__name__)

# bodies larger than this are refused with a 413: a full 128k-token prompt is well under it
MAX_BODY = 16 << 20
FORWARDED = ("/v1/chat/completions", "/v1/completions")


def llama_server_command(
    llama_bin: Path, model: Path, sock: Path, name: str, threads: int, ctx_size: int, parallel: int,
    threads_batch: int | None = None,
) -> list[str]:  # fmt: skip
    return [
        str(llama_bin / "llama-server"), "--model", str(model), "--alias", name, "--host", str(sock),
        "--threads", str(threads), "--threads-batch", str(threads_batch or threads),
        # a KV cache of its own for each slot: a shared one lets busy slots run it full, and then
        # llama-server fails every request in flight with a 500; this way a request that does not
        # fit its slot gets a 400 before it starts, and the others are untouched
        "--ctx-size", str(ctx_size * parallel), "--parallel", str(parallel), "--no-kv-unified",
        "--no-webui", "--offline", "--log-verbosity", "2",
    ]  # fmt: skip


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to llama-server if this process dies, even by SIGKILL
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_llama_server(command: list[str], llama_bin: Path, key: str) -> subprocess.Popen:
    log.info("starting %s", " ".join(command))
    # a key of its own as well as the private folder; in the environment, where `ps` does not show it
    env = {**os.environ, "LLAMA_API_KEY": key}
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    """An error in the OpenAI API's shape, which its clients turn into a typed exception with this message."""
    from aiohttp import web

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def make_app(upstream, name: str, api_key: str | None, created: int | None = None):
    """The proxy: checks the key, the JSON and the model name, then streams llama-server's answer back.

    `upstream` is an aiohttp.ClientSession whose requests reach llama-server (base URL http://llama).
    """
    from aiohttp import web

    created = created or int(time.time())

    @web.middleware
    async def checks(request, handler):
        if api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "Invalid API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPException as e:  # unknown paths and methods: the same JSON shape as every other error
            if e.status >= 400:
                return error(e.status, f"{request.method} {request.path}: {e.reason}.")
            raise

    async def health(request):
        return web.json_response({"status": "ok"})

    def model_card():
        return {"id": name, "object": "model", "created": created, "owned_by": "cpuforge"}

    async def models(request):
        return web.json_response({"object": "list", "data": [model_card()]})

    async def one_model(request):
        if request.match_info["model"] != name:
            return error(404, f"The model `{request.match_info['model']}` does not exist; this server serves `{name}`.",
                         code="model_not_found")  # fmt: skip
        return web.json_response(model_card())

    async def forward(request):
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"The request body is not valid JSON ({e}).")
        if not isinstance(body, dict):
            return error(400, "The request body must be a JSON object.")
        if body.get("model", name) != name:
            return error(404, f"The model `{body['model']}` does not exist; this server serves `{name}`.",
                         code="model_not_found")  # fmt: skip
        async with upstream.post(request.path, data=raw, headers={"Content-Type": "application/json"}) as answer:
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            response.charset = answer.charset
            if answer.content_type == "text/event-stream":
                response.headers["Cache-Control"] = "no-cache"
            await response.prepare(request)
            # pass llama-server's bytes on as they arrive: a streamed token leaves here when it leaves there
            try:
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                # the client left: leaving this block closes the upstream connection too, and llama-server
                # stops generating for it
                log.info("%s: client went away mid-answer", request.path)
            return response

    app = web.Application(middlewares=[checks], client_max_size=MAX_BODY)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", one_model)
    for path in FORWARDED:
        app.router.add_post(path, forward)
    return app


async def wait_ready(upstream, process: subprocess.Popen) -> None:
    """Until llama-server answers /health with 200 (it says 503 while it loads the model)."""
    import aiohttp

    while process.poll() is None:
        with contextlib.suppress(aiohttp.ClientError):
            async with upstream.get("/health") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise InputError(f"llama-server exited with code {process.returncode} before it was ready; see its log above.")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    sock.listen(512)
    return sock


async def serve(
    model: Path, llama_bin: Path, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
    threads: int = 1, ctx_size: int = 0, parallel: int = 4, name: str | None = None, threads_batch: int | None = None,
) -> None:  # fmt: skip
    """Start llama-server and the proxy; serve until SIGINT or SIGTERM, then stop both."""
    import aiohttp
    from aiohttp import web

    if not model.is_file():
        raise InputError(f"{model}: file not found.")
    if not (llama_bin / "llama-server").is_file():
        raise InputError(
            f"{llama_bin}: no llama-server (build it with `snakemake -c2 llama_cpp`, or pass --llama-bin)."
        )
    name = name or model_name(model)
    ctx_size = ctx_size or min(gguf_context_length(model), MAX_DEFAULT_CTX)
    listener = bind(host, port)
    with tempfile.TemporaryDirectory(prefix="cpuforge-serve-") as private:
        sock = Path(private) / "llama-server.sock"
        key = secrets.token_hex(16)
        process = start_llama_server(
            llama_server_command(llama_bin, model, sock, name, threads, ctx_size, parallel, threads_batch),
            llama_bin,
            key,
        )
        # no time limit: a long generation on a slow CPU is still a good answer
        upstream = aiohttp.ClientSession(
            "http://llama", connector=aiohttp.UnixConnector(path=str(sock), limit=0),
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip
        runner = web.AppRunner(make_app(upstream, name, api_key), access_log=None)
        try:
            await wait_ready(upstream, process)
            await runner.setup()
            await web.SockSite(runner, listener).start()
            address = f"[{host}]" if ":" in host else host
            log.info("serving %s at http://%s:%d/v1 (%d threads, %d for prompts, %d slots of %d tokens)",
                     name, address, listener.getsockname()[1], threads, threads_batch or threads, parallel,
                     ctx_size)  # fmt: skip
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            log.info("stopping")
        finally:
            await runner.cleanup()
            await upstream.close()
            process.terminate()
            process.wait()


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
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    args = parser.parse_args()
    if args.parallel < 1:
        raise InputError(f"--parallel must be at least 1, got {args.parallel}.")
    threads, threads_batch = default_thread_counts(args.model, args.threads, args.threads_batch)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model loads: stop quietly, as after
        asyncio.run(
            serve(args.model, args.llama_bin or default_llama_bin(args.model), args.host, args.port, args.api_key or None,
                  threads, args.ctx_size, args.parallel, args.name, threads_batch)  # fmt: skip
        )


if __name__ == "__main__":
    run(main)
