"""The server as a whole, as llama.cpp's server.cpp wires its parts: the settings checked, the port bound,
llama-server started behind the proxy, served until told to stop, then drained and stopped.

/health says `loading` from the moment the port is bound; a llama-server that dies is restarted by the
engine (up to `restarts` times in a row), and when it cannot be, `run` raises EngineFailed. On SIGTERM or
SIGINT (or `stop`), the proxy stops taking requests, lets those in flight finish for up to
`drain_timeout` seconds, then stops both processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.gguf import gguf_context_length
from cpuforge.llama.runtime import MAX_DEFAULT_CTX, default_thread_counts
from cpuforge.llama.webui import PAGE
from cpuforge.paths import default_llama_bin, model_name, webui_of
from cpuforge.serve.adapters import ModelTable, parse_named_lora
from cpuforge.serve.engine import RESTARTS, Engine, EngineFailed, llama_server_command, upstream_session
from cpuforge.serve.speculation import AUTO, SETTINGS, serving_flags
from cpuforge.text.prompt import chat_prompt_for

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0


@dataclass
class Settings:
    """What scripts.serve's flags set; None and 0 mean the defaults its --help gives."""

    model: Path
    llama_bin: Path | None = None  # the workflow's build
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port
    api_key: str | None = None
    name: str | None = None  # {model}-{qtype}
    threads: int | None = None  # the eval report's recommendation, else the physical cores
    threads_batch: int | None = None
    ctx_size: int = 0  # the model's, at most MAX_DEFAULT_CTX
    parallel: int = 4
    loras: list[str] = field(default_factory=list)  # NAME=FILE[:SCALE]
    webui: bool = True
    restarts: int = RESTARTS
    drain_timeout: float = DRAIN_TIMEOUT
    tokenizer: Path | None = None  # results/{model}/merged
    speculation: str = AUTO  # the eval report's verdict; or a setting of cpuforge.serve.speculation.SETTINGS


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}).") from None
    sock.listen(512)
    return sock


class Server:
    """One model served. Made from Settings, every input checked and the port bound (bad input raises
    InputError before llama-server starts); `run` serves. `engine` and `proxy` exist while it runs."""

    def __init__(self, settings: Settings):
        s = self.settings = settings
        if s.parallel < 1:
            raise InputError(f"--parallel must be at least 1, got {s.parallel}.")
        if s.restarts < 0:
            raise InputError(f"--restarts must be 0 or more, got {s.restarts}.")
        self.threads, self.threads_batch = default_thread_counts(s.model, s.threads, s.threads_batch)
        if s.speculation != AUTO and s.speculation not in SETTINGS:
            raise InputError(f"--speculation {s.speculation}: not one of {', '.join([AUTO, *SETTINGS])}.")
        self.llama_bin = s.llama_bin or default_llama_bin(s.model)
        loras = [parse_named_lora(a) for a in s.loras]
        if not s.model.is_file():
            raise InputError(f"{s.model}: file not found.")
        if not (self.llama_bin / "llama-server").is_file():
            raise InputError(
                f"{self.llama_bin}: no llama-server (build it with `snakemake -c2 llama_cpp`, or pass --llama-bin)."
            )
        # the chat page the workflow built beside this build (llama_cpp.webui; cpuforge.llama.webui)
        self.webui = webui_of(self.llama_bin) if s.webui else None
        if self.webui is not None and not (self.webui / PAGE).is_file():
            log.warning("no chat page at /: %s is not built (`snakemake -c2 llama_cpp` builds it); serving the API "
                        "only", self.webui)  # fmt: skip
            self.webui = None
        self.speculation = serving_flags(s.model, s.speculation)
        self.name = s.name or model_name(s.model)
        self.table = ModelTable.build(self.name, loras)
        self.prompt = chat_prompt_for(s.model, s.tokenizer)
        self.ctx_size = s.ctx_size or min(gguf_context_length(s.model), MAX_DEFAULT_CTX)
        self.listener = bind(s.host, s.port)
        self.engine: Engine | None = None
        self.proxy = None

    @property
    def url(self) -> str:
        """The API's base URL, e.g. http://127.0.0.1:8080/v1 (the bound port when --port 0)."""
        address = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"http://{address}:{self.listener.getsockname()[1]}/v1"

    def command(self, sock: Path) -> list[str]:
        s = self.settings
        return [*llama_server_command(self.llama_bin, s.model, sock, self.name, self.threads, self.ctx_size,
                                      s.parallel, self.webui, self.threads_batch),
                *self.table.server_args(), *self.speculation]  # fmt: skip

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (None: until SIGINT or SIGTERM), then drain and stop both processes.

        Raises InputError when llama-server cannot load the model, EngineFailed when it dies later and cannot
        be brought back.
        """
        from aiohttp import web

        from cpuforge.serve.app import Proxy

        s = self.settings
        with tempfile.TemporaryDirectory(prefix="cpuforge-serve-") as private:
            sock = Path(private) / "llama-server.sock"
            key = secrets.token_hex(16)
            upstream = upstream_session(sock, key)
            self.engine = Engine(self.command(sock), sock, key, upstream, s.restarts)
            self.proxy = Proxy(upstream, self.name, s.api_key, self.engine, self.webui is not None, table=self.table,
                               prompt=self.prompt)  # fmt: skip
            # aiohttp's graceful stop: close the listener, let handlers in flight finish for so long, then cancel them
            runner = web.AppRunner(self.proxy.app(), access_log=None, shutdown_timeout=s.drain_timeout)
            supervisor = None
            try:
                await runner.setup()
                await web.SockSite(runner, self.listener).start()  # at once, so /health can say `loading`
                try:
                    await self.engine.start()
                except EngineFailed as e:
                    raise InputError(f"{e}; see its log above.") from None
                log.info("serving %s at %s (%d threads, %d for prompts, %d slots of %d tokens%s)", self.name,
                         self.url, self.threads, self.threads_batch, s.parallel, self.ctx_size,
                         ", chat page at /" if self.webui else "")  # fmt: skip
                supervisor = asyncio.create_task(self.engine.supervise())
                await until_stopped(stop or on_signals(), supervisor)
                log.info("stopping: finishing the requests in flight (for up to %g s)", s.drain_timeout)
            finally:
                await runner.cleanup()
                if supervisor is not None:
                    supervisor.cancel()
                await self.engine.stop()
                await upstream.close()
                log.info("stopped")


def on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM. Only once llama-server is up: a signal while it loads ends the
    process at once, as it would any program."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(stop: asyncio.Event, supervisor: asyncio.Task) -> None:
    """Return when `stop` is set; raise the supervisor's EngineFailed if llama-server is gone for good first."""
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([supervisor, stopping], return_when=asyncio.FIRST_COMPLETED)
    if supervisor.done():
        stopping.cancel()
        supervisor.result()  # raises EngineFailed


def serve(settings: Settings) -> None:
    """Serve one model until SIGINT or SIGTERM (scripts.serve). Raises InputError for bad input,
    EngineFailed when llama-server dies and cannot be brought back."""
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while the model loads: stop quietly, as after
        asyncio.run(Server(settings).run())
