"""The engine: llama-server as a child process, started, watched, restarted when it dies, and stopped.

The proxy reaches it over a Unix socket in a private folder, with a key of its own (the connection is
`upstream`, an aiohttp.ClientSession made by `upstream_session`), so nothing but the proxy reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from pathlib import Path

from cpuforge.llama.runtime import LOAD_MODE

log = logging.getLogger(__name__)

RESTARTS = 3
BACKOFF = 1.0  # seconds before the first restart; doubled for each one after it that fails


def llama_server_command(
    llama_bin: Path, model: Path, sock: Path, name: str, threads: int, ctx_size: int, parallel: int,
    webui: Path | None = None, threads_batch: int | None = None,
) -> list[str]:  # fmt: skip
    """llama-server as scripts.serve runs it; `webui` the chat page's folder (cpuforge.llama.webui) it serves at
    /, None for the API only."""
    return [
        str(llama_bin / "llama-server"), "--model", str(model), "--alias", name, "--host", str(sock),
        "--threads", str(threads), "--threads-batch", str(threads_batch or threads),
        # a KV cache of its own for each slot: a shared one lets busy slots run it full, and then
        # llama-server fails every request in flight with a 500; this way a request that does not
        # fit its slot gets a 400 before it starts, and the others are untouched
        "--ctx-size", str(ctx_size * parallel), "--parallel", str(parallel), "--no-kv-unified",
        *LOAD_MODE, "--metrics", "--offline", "--log-verbosity", "2",
        *(["--no-webui"] if webui is None else ["--path", str(webui)]),
    ]  # fmt: skip


def upstream_session(sock: Path, key: str):
    """The proxy's aiohttp.ClientSession to llama-server on `sock` (base URL http://llama)."""
    import aiohttp

    # no time limit: a long generation on a slow CPU is still a good answer. A connection per request:
    # llama-server gives each open connection one of its few HTTP threads and closes idle ones when
    # it runs short, so a kept-alive connection could be closed just as a request goes out on it
    return aiohttp.ClientSession(
        "http://llama", connector=aiohttp.UnixConnector(path=str(sock), limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False,
        headers={"Authorization": f"Bearer {key}"},
    )  # fmt: skip


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
