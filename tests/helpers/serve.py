"""The OpenAI-compatible server as a user starts it (`python -m scripts.serve`), and a client for it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import openai

from helpers import REPO
from helpers.llama import runtime_env

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
