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
process reaches it. A chat request is rendered and tokenized here, with the merged model's
template and tokenizer (results/{model}/merged beside the GGUF, or --tokenizer FOLDER), and
llama-server is sent those token ids (cpuforge/serve/completions.py), so the model reads the
ids it was trained on; without a merged folder, llama-server's own template path. This
process is a thin proxy in front of it that answers what llama-server gets wrong for an
OpenAI client: malformed JSON (llama-server says 500), a model name it does not serve
(llama-server ignores the name) and a wrong API key (checked here, so a bad request never
reaches the model); everything else, errors included (a prompt longer than the context is a
400), passes through byte for byte, streamed as it comes.

The proxy also keeps llama-server alive: /health says `loading`, `ok` or `unavailable` (503 for
the two not ok), a request in flight when llama-server dies gets a 503 in the OpenAI error shape,
and llama-server is restarted (up to --restarts times in a row, waiting 1, 2, 4 … s); when it
cannot be (the model no longer loads), the proxy exits with code 1 and one sentence. SIGTERM or
SIGINT stops taking requests, lets those in flight finish for up to --drain-timeout seconds,
then stops both processes.
--threads (generation) and --threads-batch (prompt processing) default to `recommended_threads`
and `recommended_threads_batch` in the eval report (results/{model}/report/metrics.json) when
there is one, else the physical core count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
import sys
import tempfile
import time
from pathlib import Path

from cpuforge.serve import completions as chat_completion
from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.llama.runtime import MAX_DEFAULT_CTX, default_thread_counts, gguf_context_length
from cpuforge.serve.adapters import ModelTable, parse_named_lora
from cpuforge.paths import default_llama_bin, model_name
from cpuforge.text.prompt import chat_prompt_for

log = logging.getLogger(__name__)

# bodies larger than this are refused with a 413: a full 128k-token prompt is well under it
MAX_BODY = 16 << 20
FORWARDED = ("/v1/chat/completions", "/v1/completions")
# what the web UI asks of llama-server besides the chat itself: its settings and the model's context size
PAGE_API = ("/props",)
# headers of a page asset that the browser needs back: gzip, caching and the page's isolation policy
PAGE_HEADERS = ("Content-Type", "Content-Encoding", "ETag", "Cache-Control",
                "Cross-Origin-Embedder-Policy", "Cross-Origin-Opener-Policy")  # fmt: skip
RESTARTS = 3
BACKOFF = 1.0  # seconds before the first restart; doubled for each one after it that fails
DRAIN_TIMEOUT = 30.0


def llama_server_command(
    llama_bin: Path, model: Path, sock: Path, name: str, threads: int, ctx_size: int, parallel: int,
    webui: bool = True, threads_batch: int | None = None,
) -> list[str]:  # fmt: skip
    return [
        str(llama_bin / "llama-server"), "--model", str(model), "--alias", name, "--host", str(sock),
        "--threads", str(threads), "--threads-batch", str(threads_batch or threads),
        # a KV cache of its own for each slot: a shared one lets busy slots run it full, and then
        # llama-server fails every request in flight with a 500; this way a request that does not
        # fit its slot gets a 400 before it starts, and the others are untouched
        "--ctx-size", str(ctx_size * parallel), "--parallel", str(parallel), "--no-kv-unified",
        "--metrics", "--offline", "--log-verbosity", "2", *([] if webui else ["--no-webui"]),
    ]  # fmt: skip


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to llama-server if this process dies, even by SIGKILL
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class EngineFailed(Exception):
    """llama-server exited before it was ready. The message is one sentence."""


class Engine:
    """llama-server as a child process: started, watched, restarted when it dies, stopped.

    `ready` is true from llama-server's first 200 on /health until the process exits, and
    `restarts` counts the restarts that brought it back.
    """

    def __init__(self, command: list[str], sock: Path, key: str, upstream, restarts: int = RESTARTS,
                 backoff: float = BACKOFF):  # fmt: skip
        self.command, self.sock, self.upstream = command, sock, upstream
        # a key of its own as well as the private folder; in the environment, where `ps` does not show it
        self.env = {**os.environ, "LLAMA_API_KEY": key}
        self.max_restarts, self.backoff = restarts, backoff
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0

    async def start(self) -> None:
        """Start llama-server and wait until it answers /health with 200 (it says 503 while it loads)."""
        import aiohttp

        # a killed llama-server leaves its socket file behind, and a new one cannot bind over it
        self.sock.unlink(missing_ok=True)
        log.info("starting %s", " ".join(self.command))
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=_die_with_parent
        )
        log.info("llama-server started (pid %d), loading the model", self.process.pid)
        while self.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.upstream.get("/health") as response:
                    if response.status == 200:
                        self.ready = True
                        log.info("llama-server ready (pid %d)", self.process.pid)
                        return
            await asyncio.sleep(0.1)
        raise EngineFailed(f"llama-server exited with {exit_status(self.process.returncode)} before it was ready")

    async def supervise(self) -> None:
        """Restart llama-server whenever it dies; raise EngineFailed when every restart in a row fails."""
        while True:
            code = await self.process.wait()
            self.ready = False
            log.warning("llama-server (pid %d) died with %s", self.process.pid, exit_status(code))
            if self.max_restarts == 0:
                raise EngineFailed(f"llama-server died with {exit_status(code)}, and --restarts 0 keeps it down.")
            for attempt in range(1, self.max_restarts + 1):
                delay = self.backoff * 2 ** (attempt - 1)
                log.info("restarting llama-server in %g s (attempt %d of %d)", delay, attempt, self.max_restarts)
                await asyncio.sleep(delay)
                try:
                    await self.start()
                    break
                except EngineFailed as e:
                    last = e
            else:
                raise EngineFailed(
                    f"llama-server died with {exit_status(code)} and could not be restarted: "
                    f"{self.max_restarts} attempts in a row failed, the last because {last}; see its log above."
                )
            self.restarts += 1

    async def state(self) -> str:
        """`ok`, `loading` or `unavailable`, as llama-server's own /health says now."""
        import aiohttp

        if self.process is None or self.process.returncode is not None:
            return "unavailable"
        if not self.ready:  # not `ok` before requests are let through to it
            return "loading"
        try:
            async with self.upstream.get("/health", timeout=aiohttp.ClientTimeout(total=10)) as response:
                return {200: "ok", 503: "loading"}.get(response.status, "unavailable")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return "unavailable"

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:  # hung: it gets no say
                self.process.kill()
                await self.process.wait()


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          reason: str | None = None):  # fmt: skip
    """An error in the OpenAI API's shape, which its clients turn into a typed exception with this message.

    `reason` names a request refused before it reached llama-server, for /metrics.
    """
    from aiohttp import web

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = web.json_response(body, status=status)
    response["rejected"] = reason
    return response


NOT_READY = "llama-server is not ready (loading the model, or being restarted); try again shortly."


def unavailable(message: str = NOT_READY):
    response = error(503, message, kind="unavailable_error", code="engine_unavailable", reason="engine_unavailable")
    response.headers["Retry-After"] = "2"
    return response


def is_page(path: str) -> bool:
    """A file of the web UI: `/`, or a name with a dot (`/_app/…/bundle.js`, `/favicon.svg`).

    llama-server's API paths have no dot in them, so none of them passes for a page and escapes the key.
    """
    return (path == "/" or "." in path.rsplit("/", 1)[-1]) and ".." not in path.split("/")


class Metrics:
    """The proxy's own counters, in Prometheus' text format."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status)
        self.rejected: collections.Counter = collections.Counter()  # reason
        self.in_flight = 0

    def count(self, endpoint: str, status: int, rejected: str | None) -> None:
        self.requests[endpoint, status] += 1
        if rejected:
            self.rejected[rejected] += 1

    def text(self) -> str:
        lines = [
            "# HELP cpuforge_requests_total Requests answered by the proxy, by endpoint and status.",
            "# TYPE cpuforge_requests_total counter",
            *(f'cpuforge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
              for (e, s), n in sorted(self.requests.items())),  # fmt: skip
            "# HELP cpuforge_rejected_total Requests refused before they reached llama-server, by reason.",
            "# TYPE cpuforge_rejected_total counter",
            *(f'cpuforge_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())),
            "# HELP cpuforge_requests_in_flight Requests taken and not yet answered, this one included.",
            "# TYPE cpuforge_requests_in_flight gauge",
            f"cpuforge_requests_in_flight {self.in_flight}",
            "# HELP cpuforge_llama_server_restarts_total Times llama-server died and was brought back.",
            "# TYPE cpuforge_llama_server_restarts_total counter",
            f"cpuforge_llama_server_restarts_total {self.engine.restarts}",
            "# HELP cpuforge_llama_server_ready Whether llama-server has the model loaded and answers.",
            "# TYPE cpuforge_llama_server_ready gauge",
            f"cpuforge_llama_server_ready {int(self.engine.ready)}",
        ]
        return "\n".join(lines) + "\n"


def make_app(upstream, name: str, api_key: str | None, engine: Engine, webui: bool = True,
             created: int | None = None, table: ModelTable | None = None, prompt=None):  # fmt: skip
    """The proxy: checks the key, the JSON and the model name, then streams llama-server's answer back.

    `upstream` is an aiohttp.ClientSession whose requests reach llama-server (base URL http://llama);
    `table` names the base and its adapters (default: the base alone).
    `prompt` (a cpuforge.text.prompt.ChatPrompt) renders and tokenizes chat requests, None leaves them to llama-server.
    """
    import aiohttp
    from aiohttp import web

    created = created or int(time.time())
    table = table or ModelTable.build(name, [])
    served = ", ".join(f"`{m}`" for m in table.names())
    metrics = Metrics(engine)

    @web.middleware
    async def checks(request, handler):
        metrics.in_flight += 1
        try:
            response = await checked(request, handler)
        finally:
            metrics.in_flight -= 1
        route = request.match_info.route.resource
        # a fixed label per route, so that odd paths cannot grow the metrics without end
        if route is None or route.canonical == "/{path}":
            endpoint = "page" if webui and is_page(request.path) else "other"
        else:
            endpoint = route.canonical
        metrics.count(endpoint, response.status, response.get("rejected"))
        return response

    async def checked(request, handler):
        public = request.path == "/health" or (webui and request.method in ("GET", "HEAD") and is_page(request.path))
        if api_key is not None and not public:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "Invalid API key: send `Authorization: Bearer <key>`.", code="invalid_api_key",
                             reason="invalid_api_key")  # fmt: skip
        try:
            return await handler(request)
        except web.HTTPException as e:  # unknown paths and methods: the same JSON shape as every other error
            if e.status >= 400:
                reason = {404: "unknown_path", 405: "unknown_path", 413: "body_too_large"}.get(e.status, "bad_request")
                return error(e.status, f"{request.method} {request.path}: {e.reason}.", reason=reason)
            raise

    async def health(request):
        state = await engine.state()
        return web.json_response({"status": state}, status=200 if state == "ok" else 503)

    def model_card(model: str):
        return {"id": model, "object": "model", "created": created, "owned_by": "cpuforge"}

    async def models(request):
        return web.json_response({"object": "list", "data": [model_card(m) for m in table.names()]})

    async def one_model(request):
        if request.match_info["model"] not in table:
            return error(404, f"The model `{request.match_info['model']}` does not exist; this server serves {served}.",
                         code="model_not_found", reason="model_not_found")  # fmt: skip
        return web.json_response(model_card(request.match_info["model"]))

    async def forward(request):
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"The request body is not valid JSON ({e}).", reason="invalid_json")
        if not isinstance(body, dict):
            return error(400, "The request body must be a JSON object.", reason="invalid_json")
        if body.get("model", name) not in table:
            return error(404, f"The model `{body['model']}` does not exist; this server serves {served}.",
                         code="model_not_found", reason="model_not_found")  # fmt: skip
        if request.path == "/v1/chat/completions" and prompt is not None:
            if (why := chat_completion.needs_llama_server(body, prompt)) is None:
                if body.get("tools") and not prompt.renders_tools:
                    log.info("a chat request with tools: the chat template does not render them, so they are left out")
                if not engine.ready:
                    return unavailable()
                try:  # the model's adapters ride along as llama-server's per-request `lora`
                    return await chat_completion.respond(request, upstream, table.with_lora(body), prompt,
                                                         body.get("model", name))  # fmt: skip
                except aiohttp.ClientError as e:  # llama-server died before it answered
                    log.warning("%s: llama-server went away (%s)", request.path, e.__class__.__name__)
                    return unavailable("llama-server stopped while answering this request; it is being restarted.")
            log.info("a chat request with %s: through llama-server's own template", why)
        data = table.request_body(body, raw)  # the model's adapters, as llama-server's per-request `lora`
        return await relay(request, "POST", request.path, data=data, headers={"Content-Type": "application/json"})

    async def relay(request, method: str, path: str, **kwargs):
        """llama-server's answer to this call, streamed back as it comes; a 503 in the OpenAI shape if it is gone."""
        if not engine.ready:
            return unavailable()
        response = None
        try:
            async with upstream.request(method, path, **kwargs) as answer:
                if answer.content_type != "text/event-stream":
                    # a whole answer comes at once: read before replying, so a death midway is a clean 503
                    body = await answer.read()
                    return web.Response(status=answer.status, body=body, content_type=answer.content_type,
                                        charset=answer.charset)  # fmt: skip
                response = web.StreamResponse(status=answer.status, headers={"Cache-Control": "no-cache"})
                response.content_type = answer.content_type
                response.charset = answer.charset
                await response.prepare(request)
                # pass llama-server's bytes on as they arrive: a streamed token leaves here when it leaves there
                async for chunk in answer.content.iter_any():
                    await client_write(response, chunk)
                await response.write_eof()
        except ClientGone:
            # the client left: leaving the `async with` closed the upstream connection too, and llama-server
            # stops generating for it
            log.info("%s: client went away mid-answer", request.path)
        except aiohttp.ClientError as e:  # llama-server died before or while it answered
            log.warning("%s: llama-server went away mid-answer (%s)", request.path, e.__class__.__name__)
            if response is None:
                return unavailable("llama-server stopped while answering this request; it is being restarted.")
            # the status has gone out already: an error event, which OpenAI clients raise as an APIError
            event = {"error": {"message": "llama-server stopped while answering this request.",
                               "type": "unavailable_error", "code": "engine_unavailable"}}  # fmt: skip
            with contextlib.suppress(ClientGone):
                await client_write(response, f"data: {json.dumps(event)}\n\n".encode())
        return response

    async def props(request):
        return await relay(request, "GET", request.path)

    async def prometheus(request):
        text = metrics.text()
        if engine.ready:  # llama-server's own figures first: slots, tokens, throughput; ours even if it hangs
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with upstream.get("/metrics", timeout=aiohttp.ClientTimeout(total=5)) as answer:
                    if answer.status == 200:
                        text = await answer.text() + text
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def page(request):
        """A file of llama-server's web UI, passed through as it is (gzip and cache headers included)."""
        if not (webui and is_page(request.path)):
            return error(404, f"{request.method} {request.path}: Not Found.", reason="unknown_path")
        if not engine.ready:
            return unavailable()
        headers = {k: request.headers[k] for k in ("Accept-Encoding", "If-None-Match") if k in request.headers}
        try:
            async with upstream.get(request.rel_url.raw_path, headers=headers) as answer:
                body = await answer.read()
                kept = {k: answer.headers[k] for k in PAGE_HEADERS if k in answer.headers}
                status = answer.status
        except aiohttp.ClientError:
            return unavailable()
        if request.path == "/" and status == 404:
            return error(404, "This llama-server was built without its web UI (llama.cpp's LLAMA_BUILD_UI); "
                              "the API is at /v1.", reason="unknown_path")  # fmt: skip
        return web.Response(status=status, body=body, headers=kept)

    app = web.Application(middlewares=[checks], client_max_size=MAX_BODY)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", one_model)
    for path in FORWARDED:
        app.router.add_post(path, forward)
    for path in PAGE_API:
        app.router.add_get(path, props)
    app.router.add_get("/{path:.*}", page)
    return app


class ClientGone(Exception):
    """The client closed its connection while we wrote to it."""


async def client_write(response, data: bytes) -> None:
    # a write to a client that left raises ConnectionResetError, which aiohttp also makes a ClientError:
    # told apart here from llama-server going away
    try:
        await response.write(data)
    except ConnectionResetError:
        raise ClientGone from None


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
    threads: int = 1, ctx_size: int = 0, parallel: int = 4, name: str | None = None, loras: list = (),
    webui: bool = True, restarts: int = RESTARTS, drain_timeout: float = DRAIN_TIMEOUT, tokenizer: Path | None = None,
    threads_batch: int | None = None,
) -> None:  # fmt: skip
    """Start llama-server and the proxy; serve until SIGINT or SIGTERM, then drain and stop both.

    Raises EngineFailed when llama-server dies and cannot be brought back.
    """
    import aiohttp
    from aiohttp import web

    if not model.is_file():
        raise InputError(f"{model}: file not found.")
    if not (llama_bin / "llama-server").is_file():
        raise InputError(
            f"{llama_bin}: no llama-server (build it with `snakemake -c2 llama_cpp`, or pass --llama-bin)."
        )
    name = name or model_name(model)
    table = ModelTable.build(name, list(loras))
    prompt = chat_prompt_for(model, tokenizer)
    ctx_size = ctx_size or min(gguf_context_length(model), MAX_DEFAULT_CTX)
    listener = bind(host, port)
    with tempfile.TemporaryDirectory(prefix="cpuforge-serve-") as private:
        sock = Path(private) / "llama-server.sock"
        key = secrets.token_hex(16)
        # no time limit: a long generation on a slow CPU is still a good answer. A connection per request:
        # llama-server gives each open connection one of its few HTTP threads and closes idle ones when
        # it runs short, so a kept-alive connection could be closed just as a request goes out on it
        upstream = aiohttp.ClientSession(
            "http://llama", connector=aiohttp.UnixConnector(path=str(sock), limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip
        command = llama_server_command(llama_bin, model, sock, name, threads, ctx_size, parallel, webui, threads_batch)
        command += table.server_args()
        engine = Engine(command, sock, key, upstream, restarts)
        app = make_app(upstream, name, api_key, engine, webui, table=table, prompt=prompt)
        # aiohttp's graceful stop: close the listener, let handlers in flight finish for so long, then cancel them
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain_timeout)
        supervisor = None
        try:
            await runner.setup()
            await web.SockSite(runner, listener).start()  # at once, so /health can say `loading`
            try:
                await engine.start()
            except EngineFailed as e:
                raise InputError(f"{e}; see its log above.") from None
            address = f"[{host}]" if ":" in host else host
            log.info("serving %s at http://%s:%d/v1 (%d threads, %d for prompts, %d slots of %d tokens%s)",
                     name, address, listener.getsockname()[1], threads, threads_batch or threads, parallel, ctx_size,
                     ", chat page at /" if webui else "")  # fmt: skip
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            supervisor = asyncio.create_task(engine.supervise())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([supervisor, stopping], return_when=asyncio.FIRST_COMPLETED)
            if supervisor.done():
                stopping.cancel()
                supervisor.result()  # raises EngineFailed
            log.info("stopping: finishing the requests in flight (for up to %g s)", drain_timeout)
        finally:
            await runner.cleanup()
            if supervisor is not None:
                supervisor.cancel()
            await engine.stop()
            await upstream.close()
            log.info("stopped")


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
    parser.add_argument("--restarts", type=int, default=RESTARTS,
                        help=f"restarts in a row of a llama-server that died before giving up (default {RESTARTS})")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT,
                        help=f"seconds that requests in flight get to finish on SIGTERM (default {DRAIN_TIMEOUT:g})")  # fmt: skip
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=FILE[:SCALE]",
                        help="serve BASE+NAME: the model with this GGUF LoRA; repeat (a NAME again stacks)")  # fmt: skip
    parser.add_argument("--tokenizer", type=Path, metavar="FOLDER",
                        help="HF folder whose tokenizer and template build chat prompts (default: results/{model}/merged)")
    args = parser.parse_args()
    if args.parallel < 1:
        raise InputError(f"--parallel must be at least 1, got {args.parallel}.")
    if args.restarts < 0:
        raise InputError(f"--restarts must be 0 or more, got {args.restarts}.")
    threads, threads_batch = default_thread_counts(args.model, args.threads, args.threads_batch)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model loads: stop quietly, as after
            asyncio.run(
                serve(args.model, args.llama_bin or default_llama_bin(args.model), args.host, args.port,
                      args.api_key or None, threads, args.ctx_size, args.parallel, args.name,
                      [parse_named_lora(a) for a in args.lora], not args.no_webui, args.restarts, args.drain_timeout,
                      args.tokenizer, threads_batch)  # fmt: skip
            )
    except EngineFailed as e:
        # for a supervisor (systemd, SLURM): the server is gone, and why, in one line
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    run(main)
