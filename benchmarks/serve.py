"""Generation speed of our chat and our server, each divided by llama-bench's tg, on one GGUF, in one run.

    python -m benchmarks.serve results/demo/ggml-model-q4_0.gguf --threads 1 2
    python -m benchmarks.serve results/demo/ggml-model-q4_0.gguf --threads 2 --compare-llama-cpp-python

For each thread count: llama-bench's tg figure (-p 0 -n --tokens, the pinned build's defaults
otherwise), then the same model answering the same chat prompts greedily through
scripts.chat's GGUF path (llama-cpp-python on the pinned libllama) and through
scripts.serve (llama-server behind our proxy, streamed to the official openai client).
A path's tokens/s is decode speed as a user sees it: the answer's tokens after the first,
divided by the time from the first streamed piece to the last, summed over the prompts,
so prompt processing is left out as it is from tg. The prompts are the demo task's held-out
questions (any chat model answers them), or --prompts FILE (JSON lines of message lists).
The paths take turns, --repetitions times, and each path's best run counts: on a shared
machine other work only ever slows a run down.

--compare-llama-cpp-python also times llama-cpp-python's own server (needs its `server`
extra) for one client and for --concurrency clients at once, against ours: the figures
behind docs/serve.md's choice. Figures go to --out (default benchmarks/{model}/serve_{qtype}.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpuforge.catalogue import MERGED, parse_gguf
from cpuforge.serve.chat import Generation, GGUFChat
from cpuforge.cli import run
from cpuforge.errors import InputError
from cpuforge.io.files import write_json
from cpuforge.llama.runtime import LOAD_MODE, check_threads, llama_cpp_env
from cpuforge.paths import default_llama_bin, model_name
from cpuforge.text.task import load_split, messages

log = logging.getLogger(__name__)


def llama_bench_tg(llama_bin: Path, model: Path, threads: int, tokens: int, repetitions: int) -> float:
    cmd = [str(llama_bin / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
           "-r", str(repetitions), "-o", "json", *LOAD_MODE]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    (row,) = json.loads(out)
    return max(row["samples_ts"])


def decode_rate(answers: list[tuple[int, float, float]]) -> float:
    """tokens/s over answers given as (tokens, time of the first piece, time of the last piece)."""
    tokens = sum(n - 1 for n, _, _ in answers if n > 1)
    seconds = sum(last - first for n, first, last in answers if n > 1)
    if tokens < 16:
        raise InputError(f"the prompts drew only {tokens} decoded tokens: too few to time; give longer --prompts.")
    return tokens / seconds


def timed_pieces(pieces) -> tuple[float, float]:
    first = last = None
    for piece in pieces:
        if piece:
            last = time.perf_counter()
            first = first or last
    return first or 0.0, last or 0.0


def chat_rate(chat: GGUFChat, prompts: list[list[dict]], gen: Generation) -> float:
    answers = []
    for conversation in prompts:
        first, last = timed_pieces(chat.stream(conversation, gen))
        answers.append((chat.n_generated, first, last))
    return decode_rate(answers)


def client_answer(client, name: str, conversation: list[dict], max_tokens: int, timings: list | None = None):
    """(tokens, time of the first piece, time of the last) of one streamed answer.

    llama-server's own decode figures (its `timings`), when it sends them, are appended to `timings`.
    """
    stream = client.chat.completions.create(
        model=name, messages=conversation, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage, pieces_seen = None, 0

    def pieces():
        nonlocal usage, pieces_seen
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            if timings is not None and (chunk.model_extra or {}).get("timings"):
                timings.append(chunk.model_extra["timings"])
            if chunk.choices and chunk.choices[0].delta.content:
                pieces_seen += 1
                yield chunk.choices[0].delta.content

    first, last = timed_pieces(pieces())
    # llama-cpp-python's server reports no usage when streaming; it sends a piece per token
    return usage if usage is not None else pieces_seen, first, last


def open_client(url: str, name: str):
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=None)
    client_answer(client, name, [{"role": "user", "content": "Hello"}], 8)  # the first request pays for set-up
    return client


def server_rate(client, name: str, prompts: list[list[dict]], max_tokens: int) -> tuple[float, float | None]:
    """One client's decode tokens/s as it sees them, and the server's own figure for the same answers."""
    timings = []
    rate = decode_rate([client_answer(client, name, p, max_tokens, timings) for p in prompts])
    if not timings:
        return rate, None
    # llama-server's predicted_ms runs from its first sampled token: drop that token's share, as we do
    tokens = sum(t["predicted_n"] - 1 for t in timings)
    ms = sum(t["predicted_ms"] * (t["predicted_n"] - 1) / t["predicted_n"] for t in timings if t["predicted_n"])
    return rate, 1000 * tokens / ms


def clients_rate(client, name: str, prompts: list[list[dict]], max_tokens: int, clients: int) -> float:
    """All answer tokens/s while `clients` clients ask at once."""
    work = [prompts[i % len(prompts)] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: client_answer(client, name, p, max_tokens), work))
    return sum(n for n, _, _ in answers) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process for the length of a `with` block; its output goes to a file."""

    def __init__(self, cmd: list[str], env: dict, ready):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while self.process.poll() is None and not (url := ready(Path(self.log.name).read_text())):
            time.sleep(0.2)
        if self.process.poll() is not None:
            raise InputError(f"{cmd[0]} exited before serving; see {self.log.name}.")
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait()
        Path(self.log.name).unlink()


def our_server(model: Path, llama_bin: Path, threads: int, parallel: int) -> Server:
    cmd = [sys.executable, "-m", "scripts.serve", str(model), "--port", "0", "--threads", str(threads),
           "--parallel", str(parallel), "--llama-bin", str(llama_bin)]  # fmt: skip

    def ready(text):
        match = re.search(r"serving \S+ at (http://\S+/v1)", text)
        return match and match[1]

    return Server(cmd, llama_cpp_env(llama_bin), ready)


def llama_cpp_python_server(model: Path, llama_bin: Path, threads: int, name: str) -> Server:
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", name, "--host",
           "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", "4096", "--flash_attn", "true", "--verbose", "false", "--interrupt_requests", "false"]  # fmt: skip

    def ready(_):
        try:
            with urllib.request.urlopen(f"{url}/models") as response:
                return response.status == 200 and url
        except OSError:
            return None

    return Server(cmd, llama_cpp_env(llama_bin), ready)


def load_prompts(path: Path | None, n: int) -> list[list[dict]]:
    if path is None:
        return [messages(row) for row in load_split("heldout")[:n]]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]


def benchmark(
    model: Path, llama_bin: Path, threads: list[int], prompts: list[list[dict]], tokens: int = 128,
    repetitions: int = 3, compare: bool = False, concurrency: int = 8,
) -> dict:  # fmt: skip
    """Figures per thread count: each path's best run, every run, and the ratios of the best runs.

    The paths take turns, run after run, so a burst of other work on the machine hits them
    alike; the best run counts, as other work can only ever slow a run down.
    """
    name = model_name(model)
    gen = Generation(max_new_tokens=tokens)
    figures = {"model": str(model), "name": name, "tokens": tokens, "prompts": len(prompts), "threads": {}}
    for t in threads:
        runs = {"llama_bench_tg": [], "chat": [], "server": [], "llama_server_internal": []}
        chat = GGUFChat(model, t, llama_bin=llama_bin)
        chat_rate(chat, prompts[:1], gen)  # warm-up
        extra = {}
        with our_server(model, llama_bin, t, parallel=concurrency if compare else 1) as server:
            client = open_client(server.url, name)
            for _ in range(repetitions):
                runs["llama_bench_tg"].append(llama_bench_tg(llama_bin, model, t, tokens, 1))
                runs["chat"].append(chat_rate(chat, prompts, gen))
                rate, internal = server_rate(client, name, prompts, tokens)
                runs["server"].append(rate)
                runs["llama_server_internal"].append(internal)
            if compare:
                extra[f"server_{concurrency}_clients"] = clients_rate(client, name, prompts, tokens, concurrency)
        del chat
        if compare:
            with llama_cpp_python_server(model, llama_bin, t, name) as server:
                client = open_client(server.url, name)
                runs["llama_cpp_python_server"] = [
                    server_rate(client, name, prompts, tokens)[0] for _ in range(repetitions)
                ]
                extra[f"llama_cpp_python_server_{concurrency}_clients"] = clients_rate(
                    client, name, prompts, tokens, concurrency
                )
        row = {path: max(rates) for path, rates in runs.items()} | extra
        for path in runs:
            if path != "llama_bench_tg":
                row[f"{path}_ratio"] = row[path] / row["llama_bench_tg"]
        log.info("%d threads: %s", t, ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
        figures["threads"][str(t)] = {**row, "runs": runs}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="GGUF file")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=128, help="llama-bench -n, and the longest answer")
    parser.add_argument("--prompts", type=Path, help="JSON lines, each a list of chat messages")
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--compare-llama-cpp-python", action="store_true")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--llama-bin", type=Path, help="pinned llama.cpp bin folder (default: the workflow's build)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/{model}/serve_{qtype}.json")
    args = parser.parse_args()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai client's line per request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for t in args.threads:
        check_threads(t)
    if not args.model.is_file():
        raise InputError(f"{args.model}: file not found.")
    llama_bin = (args.llama_bin or default_llama_bin(args.model)).resolve()
    figures = benchmark(
        args.model, llama_bin, args.threads, load_prompts(args.prompts, args.n_prompts), args.tokens,
        args.repetitions, args.compare_llama_cpp_python, args.concurrency,
    )  # fmt: skip
    # benchmarks/demo/serve_q4_0.json for results/demo/ggml-model-q4_0.gguf
    model, name = args.model.resolve(), parse_gguf(args.model)
    stage = name.stage if name and name.weights == MERGED else model.stem
    out = args.out or Path("benchmarks") / model.parent.name / f"serve_{stage}.json"
    write_json(out, figures)
    log.info("figures written to %s", out)


if __name__ == "__main__":
    run(main)
