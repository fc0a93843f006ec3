"""A soak test of scripts.serve on loopback, and the same load straight against llama-server for its overhead.

    python -m benchmarks.soak results/demo/ggml-model-q4_0.gguf [--clients 8] [--minutes 4]

Run by hand, not in CI. Two phases of --minutes each, one after the other, on the same model and
settings: `ours` (scripts.serve, the proxy in front of llama-server) and `direct` (llama-server
alone on a loopback port, as scripts.serve starts it). In each, --clients clients send requests
back to back: chat and completions, streamed and not, some malformed (bad JSON, a wrong model, a
wrong key), some hanging up after the first streamed piece. Halfway through `ours`, llama-server
is killed with SIGKILL: the requests it held must end in a 503 or a streamed error event, and
serving must resume. With the defaults (8 clients, 4 minutes) the run takes about 10 minutes.

The table gives, per phase: requests done, errors by kind (`unexpected` must be 0 for `ours`),
p50/p95/p99 latency of the answered requests, generated tokens/s over the phase, and the RSS of the
proxy and of llama-server at start and end; then ours ÷ direct. The figures, with the restart's
timeline, go to --out (default benchmarks/{model}/soak_{qtype}.json).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.io.gguf import gguf_context_length
from cpuforge.io.files import write_json
from cpuforge.llama.runtime import MAX_DEFAULT_CTX, check_threads, llama_cpp_env
from cpuforge.paths import default_llama_bin, model_name
from cpuforge.serve.engine import llama_server_command

log = logging.getLogger(__name__)

KEY = "soak-key"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "What does a compiler do?",
]
# what each client's next request is, by weight
MIX = {"chat": 30, "chat_stream": 25, "completion": 15, "completion_stream": 15, "malformed": 8, "hang_up": 7}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        return int(match[1]) / 1024 if match else None
    return None


def children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


class Tally:
    """What one phase's requests came to."""

    def __init__(self):
        self.done = 0
        self.latencies: list[float] = []
        self.tokens = 0
        self.kinds: collections.Counter = collections.Counter()
        self.unavailable: list[tuple[float, str]] = []  # when each 503 or cut stream came, to set against the restart

    def figures(self, seconds: float) -> dict:
        return {
            "requests": self.done, "errors": dict(sorted(self.kinds.items())),
            "p50_s": percentile(self.latencies, 50), "p95_s": percentile(self.latencies, 95),
            "p99_s": percentile(self.latencies, 99), "tokens_per_s": self.tokens / seconds, "seconds": seconds,
        }  # fmt: skip


def body(kind: str, name: str, rng: random.Random) -> dict:
    question = rng.choice(QUESTIONS)
    tokens = rng.randint(16, 64)
    if kind.startswith("completion"):
        return {"model": name, "prompt": question, "max_tokens": tokens, "stream": kind.endswith("stream")}
    return {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "stream": kind != "chat"}  # fmt: skip


async def one_request(session, base: str, name: str, kind: str, rng: random.Random, tally: Tally) -> None:
    """Send one request of `kind` and tally how it ended."""
    headers = {"Authorization": f"Bearer {KEY}"}
    if kind == "malformed":
        bad = rng.choice(["json", "model", "key"])
        data = b'{"messages": [' if bad == "json" else json.dumps(body("chat", "no-such-model" if bad == "model"
                                                                            else name, rng)).encode()  # fmt: skip
        headers = {"Authorization": "Bearer wrong"} if bad == "key" else headers
        async with session.post(f"{base}/v1/chat/completions", data=data, headers=headers) as response:
            await response.read()
            tally.kinds[f"malformed answered {response.status // 100}xx"] += 1
        return
    path = "/v1/completions" if kind.startswith("completion") else "/v1/chat/completions"
    payload = body(kind, name, rng)
    start = time.perf_counter()
    async with session.post(f"{base}{path}", json=payload, headers=headers) as response:
        if response.status == 503:
            await response.read()
            tally.unavailable.append((time.monotonic(), "503"))
            await asyncio.sleep(0.2)  # as a client that heeds Retry-After would, if more briefly
            return
        if response.status != 200:
            tally.kinds[f"unexpected: status {response.status}: {(await response.text())[:80]}"] += 1
            return
        if not payload["stream"]:
            answer = await response.json()
            tally.tokens += answer["usage"]["completion_tokens"]
        else:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    tally.unavailable.append((time.monotonic(), "stream cut by an error event"))
                    return
                tally.tokens += 1 if event.get("choices") else 0
                if kind == "hang_up":
                    tally.kinds["client hung up (on purpose)"] += 1
                    return  # leaving the block closes the connection mid-answer
    tally.latencies.append(time.perf_counter() - start)
    tally.done += 1


async def load(base: str, name: str, clients: int, seconds: float, seed: int, tally: Tally) -> None:
    import aiohttp

    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        kinds, weights = zip(*MIX.items(), strict=True)
        # a connection per request, in both phases: llama-server closes kept-alive connections when its HTTP
        # threads run short, and a request sent on one just then fails (see cpuforge/serve/engine.py)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                try:
                    await one_request(session, base, name, kind, rng, tally)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    tally.kinds[f"unexpected: {e.__class__.__name__}"] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))


def start(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, url: str) -> None:
    import urllib.request

    while process.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise InputError(f"{process.args[0]} exited with code {process.returncode} before it was ready.")


async def health_watch(base: str, stop: asyncio.Event, timeline: list, began: float) -> None:
    """Record each change of /health, with the time since the phase began."""
    import aiohttp

    last = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while not stop.is_set():
            try:
                async with session.get(f"{base}/health") as response:
                    state = (await response.json())["status"]
            except (aiohttp.ClientError, asyncio.TimeoutError):
                state = "no answer"
            if state != last:
                timeline.append((round(time.monotonic() - began, 3), f"/health: {state}"))
                last = state
            await asyncio.sleep(0.05)


async def phase(base: str, name: str, clients: int, seconds: float, kill=None) -> tuple[Tally, list]:
    tally, timeline = Tally(), []
    stop = asyncio.Event()
    began = time.monotonic()
    watch = asyncio.create_task(health_watch(base, stop, timeline, began)) if kill else None

    async def killer():
        await asyncio.sleep(seconds / 2)
        at = time.monotonic()
        timeline.append((round(at - began, 3), f"llama-server (pid {kill()}) killed with SIGKILL"))

    tasks = [load(base, name, clients, seconds, 1, tally)] + ([killer()] if kill else [])
    await asyncio.gather(*tasks)
    stop.set()
    if watch:
        await watch
    # a 503 is expected from the kill until /health says ok again, and a fault at any other time
    killed = next((t for t, what in timeline if "killed" in what), None)
    back = next((t for t, what in sorted(timeline) if killed and t > killed and what == "/health: ok"), None)
    for at, what in tally.unavailable:
        t = at - began
        down = killed is not None and killed <= t and (back is None or t <= back + 0.5)
        tally.kinds[f"{what} while llama-server was down" if down else f"unexpected: {what} while it was up"] += 1
    return tally, sorted(timeline)


def soak(model: Path, llama_bin: Path, clients: int, minutes: float, threads: int, parallel: int) -> dict:
    env = {**llama_cpp_env(llama_bin), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    name = model_name(model)
    seconds = minutes * 60
    figures = {"model": str(model), "clients": clients, "minutes": minutes, "threads": threads, "parallel": parallel}
    with tempfile.TemporaryDirectory(prefix="cpuforge-soak-") as tmp:
        port = free_port()
        cmd = [sys.executable, "-m", "scripts.serve", str(model), "--port", str(port), "--api-key", KEY,
               "--threads", str(threads), "--parallel", str(parallel), "--llama-bin", str(llama_bin)]  # fmt: skip
        proxy = start(cmd, Path(tmp) / "serve.log", env)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(proxy, f"{base}/health")
            (engine,) = children(proxy.pid)
            rss = {"proxy_start_mb": rss_mb(proxy.pid), "llama_server_start_mb": rss_mb(engine)}

            def kill() -> int:
                (pid,) = children(proxy.pid)
                os.kill(pid, signal.SIGKILL)
                return pid

            log.info("ours: %d clients for %g min, llama-server killed halfway", clients, minutes)
            tally, timeline = asyncio.run(phase(base, name, clients, seconds, kill))
            engines = children(proxy.pid)
            rss |= {"proxy_end_mb": rss_mb(proxy.pid), "llama_server_end_mb": rss_mb(engines[0] if engines else None)}
            figures["ours"] = tally.figures(seconds) | rss | {"restart_timeline": timeline}
            restarts = re.findall(r".*(?:died|restarting|started|ready).*", (Path(tmp) / "serve.log").read_text())
            figures["ours"]["restart_log"] = [line for line in restarts if "cpuforge.serve.engine" in line]
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait()

        port = free_port()
        cmd = llama_server_command(llama_bin, model, "127.0.0.1", name, threads, context_size(model), parallel)
        engine = start([*cmd, "--port", str(port), "--api-key", KEY], Path(tmp) / "llama-server.log", env)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(engine, f"{base}/health")
            rss = {"llama_server_start_mb": rss_mb(engine.pid)}
            log.info("direct: %d clients for %g min against llama-server alone", clients, minutes)
            tally, _ = asyncio.run(phase(base, name, clients, seconds))
            figures["direct"] = tally.figures(seconds) | rss | {"llama_server_end_mb": rss_mb(engine.pid)}
        finally:
            engine.terminate()
            engine.wait()
    return figures


def context_size(model: Path) -> int:
    """Each slot's context, as scripts.serve gives it by default."""
    return min(gguf_context_length(model), MAX_DEFAULT_CTX)


def table(figures: dict) -> str:
    ours, direct = figures["ours"], figures["direct"]

    def cell(value, unit=""):
        return "–" if value is None else f"{value:.3g}{unit}" if isinstance(value, float) else str(value)

    def ratio(key):
        return cell(ours[key] / direct[key]) if ours[key] and direct[key] else "–"

    rows = [("requests answered", "requests"), ("p50 latency (s)", "p50_s"), ("p95 latency (s)", "p95_s"),
            ("p99 latency (s)", "p99_s"), ("tokens/s", "tokens_per_s"),
            ("llama-server RSS start → end (MB)", None), ("proxy RSS start → end (MB)", None)]  # fmt: skip
    lines = ["| | ours (llama-server killed halfway) | llama-server direct | ours ÷ direct |", "| --- " * 4 + "|"]
    for label, key in rows:
        if key:
            lines.append(f"| {label} | {cell(ours[key])} | {cell(direct[key])} | {ratio(key)} |")
        elif label.startswith("llama-server"):
            lines.append(f"| {label} | {cell(ours['llama_server_start_mb'])} → {cell(ours['llama_server_end_mb'])} | "
                         f"{cell(direct['llama_server_start_mb'])} → {cell(direct['llama_server_end_mb'])} | |")  # fmt: skip
        else:
            lines.append(f"| {label} | {cell(ours['proxy_start_mb'])} → {cell(ours['proxy_end_mb'])} | – | |")
    for side in ("ours", "direct"):
        errors = "; ".join(f"{k}: {v}" for k, v in figures[side]["errors"].items()) or "none"
        lines.append(f"| outcomes other than an answer, {side} | {errors} | | |")
    lines += ["", "restart timeline (seconds since the phase began):"]
    lines += [f"  {t:8.3f}  {what}" for t, what in ours["restart_timeline"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="GGUF file")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=4.0, help="length of each of the two phases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/{model}/soak_{qtype}.json")
    args = parser.parse_args()
    if not args.model.is_file():
        raise InputError(f"{args.model}: file not found.")
    if args.clients < 1 or args.minutes <= 0:
        raise InputError(f"--clients must be at least 1 and --minutes above 0, got {args.clients} and {args.minutes}.")
    figures = soak(args.model, args.llama_bin or default_llama_bin(), args.clients, args.minutes,
                   check_threads(args.threads), args.parallel)  # fmt: skip
    out = args.out or Path("benchmarks") / args.model.resolve().parent.name / f"soak_{model_name(args.model)}.json"
    write_json(out, figures)
    print(table(figures))
    log.info("figures written to %s", out)
    unexpected = sum(n for k, n in figures["ours"]["errors"].items() if k.startswith("unexpected"))
    if unexpected:
        raise InputError(f"{unexpected} requests through the proxy ended in an unexpected way; see {out}.")


if __name__ == "__main__":
    run(main)
