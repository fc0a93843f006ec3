"""The OpenAI-compatible server as a user starts it (`python -m scripts.serve`) or in this process, and a client for it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

from helpers import REPO
from helpers.llama import runtime_env

from cpuforge.serve.server import Server, Settings

KEY = "test-key-1234"


def start_server(llama_bin, log: Path, *args, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scripts.serve", *map(str, args)]
    # stderr to a file, not a pipe: a pipe nobody reads would fill and stall the server
    return subprocess.Popen(cmd, cwd=REPO, env={**runtime_env(llama_bin), **(env or {})}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_url(process: subprocess.Popen, log: Path) -> str:
    """The URL the server logs once it serves; fails if the server exits first."""
    while process.poll() is None:
        if match := re.search(r"serving \S+ at (http://\S+/v1)", log.read_text()):
            return match[1]
        time.sleep(0.1)
    raise AssertionError(f"the server exited with code {process.returncode}:\n{log.read_text()}")


def client(url: str, key: str = KEY) -> openai.OpenAI:
    # a deadlock guard far above any answer's time on a loaded machine, not a speed limit
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=900)


class InProcess:
    """The server of scripts.serve run in this process: Server(settings) checks the input and binds the
    port here (bad input raises in the test), then serves from a thread with an event loop of its own,
    as `asyncio.run` would in the CLI, until `close()` stops it as SIGINT does."""

    def __init__(self, settings: Settings):
        self.server = Server(settings)
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="serve")
        self.thread.start()

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self.server.run(self.stop))
        except BaseException as e:  # handed to the test by ready() or close()
            self.failure = e
        finally:
            self.loop.close()

    @property
    def url(self) -> str:
        return self.server.url

    def ready(self) -> InProcess:
        """Once llama-server has loaded the model; fails if the server stopped first."""
        while not (self.server.engine is not None and self.server.engine.ready):
            if not self.thread.is_alive():
                raise AssertionError(f"the server stopped before it served: {self.failure!r}")
            time.sleep(0.1)
        return self

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join()
        if self.failure is not None:
            raise self.failure
