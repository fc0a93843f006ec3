"""The weights held once: peak RSS, load time and speed of the llama.cpp runtimes with the GGUF mapped
(llama.cpp's default) and read (cpuforge.llama.runtime.LOAD_MODE, as cpuforge runs it), side by side in one run.

    python -m benchmarks.weights_once results/demo/ggml-model-q4_0.gguf --logits F16_LOGITS [--threads 2]
    python -m benchmarks.weights_once results/scale/ggml-model-q4_0.gguf --rounds 1 --no-bench   # the 7B shape

In turns, `--rounds` of each way (each figure's best kept: other work only adds to a peak or a time):
- server: llama-server as scripts.serve starts it (cpuforge.serve.engine.llama_server_command, context 512,
  one slot), its time to the first 200 on /health, one request of 64 new tokens, then its VmHWM;
- chat: llama-cpp-python as scripts.chat opens a GGUF (context 512, flash attention), 64 new tokens after a
  short prompt, its VmHWM;
- eval_kl_divergence: llama-perplexity --kl-divergence as the rule runs it (cpuforge.evaluate.perplexity,
  through cpuforge/llama/tool.py) against the f16's saved log-probabilities (`--logits`, made by
  scripts.eval_perplexity --save-logits), its process's peak RSS;
then llama-bench's pp512 and tg128, one load mode and the other in turns, each one's fastest sample.
Beside each peak: the plan's figure (cpuforge.sizing: eval_kl_divergence's Need; for the server and the chat,
which no rule runs, the work of a llama.cpp run on their context, without a process's base), the peak over
that work (the GGUF, KV cache, compute and output buffers, which the weights held once keep under 1.1), the
buffers llama.cpp logs when it loads (model, repacked, KV cache, compute, output) and the load times.
Prints markdown tables. The demo's q4_0 takes about five minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpuforge.cli import run
from cpuforge.llama.runtime import LOAD_MODE, check_threads, llama_cpp_env
from cpuforge.paths import default_llama_bin
from cpuforge.serve.engine import llama_server_command
from cpuforge.constants import MIB
from cpuforge.sizing.costs import BASE_MB
from cpuforge.sizing.gguf_size import read_gguf
from cpuforge.sizing.needs import eval_kl_divergence_need
from cpuforge.sizing.parts import llama_run

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CTX = 512
MODES = {"mapped": ["--load-mode", "auto"], "read": LOAD_MODE}
VERBOSE = ["--log-verbosity", "4"]  # where the tools log their buffers and load time
# the buffers llama.cpp logs as it loads a model and makes a context
BUFFER = re.compile(r"(\S+) +(model|KV|compute|output) buffer size = +([0-9.]+) MiB")
LOAD_TIME = re.compile(r"load time = +([0-9.]+) ms")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

CHAT = """import os, re, sys, time
from cpuforge.llama.runtime import load_llama_cpp
llama_cpp = load_llama_cpp(os.environ["LLAMA_CPP_LIB_PATH"])
began = time.perf_counter()
llm = llama_cpp.Llama(sys.argv[1], use_mmap=sys.argv[2] == "mapped", n_ctx=int(sys.argv[3]), n_threads=int(sys.argv[4]),
                      n_threads_batch=int(sys.argv[4]), flash_attn=True, verbose=True)
loaded = time.perf_counter() - began
llm(sys.argv[5], max_tokens=64, temperature=0.0)
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
print(f"RESULT {loaded} {hwm}", file=sys.stderr, flush=True)
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path):
        super().__init__("llama", timeout=600)
        self.path = str(path)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def get(sock: Path, method: str, url: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(method, url, json.dumps(body) if body else None, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def vm_hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


def buffers_mib(log_text: str) -> float:
    """llama.cpp's buffers of the model (each buffer type: as stored, repacked) and of the context."""
    return sum(float(m[3]) for m in BUFFER.finditer(log_text))


def server(llama_bin: Path, gguf: Path, mode: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sock, logfile = Path(tmp) / "server.sock", Path(tmp) / "server.log"
        cmd = [*llama_server_command(llama_bin, gguf, sock, "m", threads, CTX, 1), *MODES[mode], *VERBOSE]
        with open(logfile, "w") as out:
            began = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"llama-server exited with {proc.returncode}; see {logfile}")
                try:
                    if get(sock, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            loaded = time.perf_counter() - began
            status, body = get(sock, "POST", "/completion", {"prompt": PROMPT, "n_predict": 64, "temperature": 0})
            assert status == 200, body
            peak = vm_hwm_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
        return {"peak": peak, "load_s": loaded, "buffers": buffers_mib(logfile.read_text())}


def chat(llama_bin: Path, gguf: Path, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-c", CHAT, str(gguf), mode, str(CTX), str(threads), PROMPT]
    result = subprocess.run(cmd, cwd=REPO, env=llama_cpp_env(llama_bin), capture_output=True, text=True, check=True)
    loaded, hwm = re.search(r"^RESULT (\S+) (\d+)$", result.stderr, re.MULTILINE).groups()
    return {"peak": int(hwm) / 1024, "load_s": float(loaded), "buffers": buffers_mib(result.stderr)}


def kl_divergence(llama_bin: Path, gguf: Path, logits: Path, ctx: int, mode: str, threads: int) -> dict:
    """The rule's llama-perplexity (its arguments as cpuforge.evaluate.perplexity.kl_divergence gives them, the
    load mode last, which wins), in a process of its own; its VmHWM, read until it exits (not its ru_maxrss,
    which Linux carries over from this process through fork and exec)."""
    args = ["-m", gguf, "--kl-divergence-base", logits, "--kl-divergence", "-c", ctx, "-b", ctx, "-t", threads,
            *MODES[mode], *VERBOSE]  # fmt: skip
    tool = REPO / "cpuforge" / "llama" / "tool.py"
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, str(tool), str(llama_bin / "llama-perplexity"), *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        peak = 0.0
        while proc.poll() is None:
            with contextlib.suppress(OSError, TypeError):  # gone, or a zombie without its memory figures
                peak = vm_hwm_mib(proc.pid)
            time.sleep(0.05)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        sys.exit(f"llama-perplexity failed:\n{text[-2000:]}")
    return {"peak": peak, "load_s": float(LOAD_TIME.search(text)[1]) / 1000,
            "buffers": buffers_mib(text)}  # fmt: skip


def bench(llama_bin: Path, gguf: Path, threads: int, repetitions: int, rounds: int) -> dict:
    """pp512 and tg128 tokens/s of each load mode: llama-bench runs of one mode and the other in turns, each
    mode's fastest sample kept."""
    speed: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for mode, flags in MODES.items():
            cmd = [str(llama_bin / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repetitions),
                   "-o", "json", *flags]  # fmt: skip
            for row in json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout):
                key = (mode, "pp" if row["n_gen"] == 0 else "tg")
                speed[key] = max(speed.get(key, 0.0), *row["samples_ts"])
    return speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--logits", type=Path, help="the f16's saved log-probabilities (without: no KL row)")
    parser.add_argument("--logits-ctx", type=int, default=CTX, help="the context they were saved at (eval.ctx)")
    parser.add_argument("--llama-bin", type=Path, help="the pinned llama.cpp bin folder (default: the workflow's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way of loading, in turns")
    parser.add_argument("--repetitions", type=int, default=5, help="llama-bench -r")
    parser.add_argument("--no-bench", action="store_true", help="leave out llama-bench (pp512 is minutes at 7B)")
    args = parser.parse_args()
    threads = check_threads(args.threads)
    llama_bin = args.llama_bin or default_llama_bin(args.gguf)
    stages = {"server": lambda mode: server(llama_bin, args.gguf, mode, threads),
              "chat": lambda mode: chat(llama_bin, args.gguf, mode, threads)}  # fmt: skip
    if args.logits:
        stages["eval_kl_divergence"] = lambda mode: kl_divergence(llama_bin, args.gguf, args.logits, args.logits_ctx,
                                                                  mode, threads)  # fmt: skip
    best: dict[tuple[str, str], dict] = {}
    for n in range(args.rounds):
        for stage, measure in stages.items():
            for mode in MODES:
                got = measure(mode)
                log.info("round %d, %s, %s: peak %.1f MiB, load %.2f s, llama.cpp's buffers %.1f MiB", n + 1, stage,
                         mode, got["peak"], got["load_s"], got["buffers"])  # fmt: skip
                old = best.get((stage, mode), got)
                best[(stage, mode)] = {k: min(old[k], got[k]) for k in got}
    speed = None if args.no_bench else bench(llama_bin, args.gguf, threads, args.repetitions, args.rounds)

    g = read_gguf(args.gguf)
    # no rule runs the server or the chat: the work of a llama.cpp run on their context (the GGUF, KV cache,
    # compute and output buffers as cpuforge.sizing counts them), without a process's base
    work = {"server": llama_run("plan", g, CTX, 1, threads).mem - BASE_MB["plan"],
            "eval_kl_divergence": llama_run("plan", g, args.logits_ctx, args.logits_ctx, threads).mem - BASE_MB["plan"]}  # fmt: skip
    work["chat"] = work["server"]
    predicted = {"server": work["server"], "chat": work["chat"],
                 "eval_kl_divergence": eval_kl_divergence_need(g, args.logits_ctx, 1, threads).mem_mb}  # fmt: skip
    print(f"{args.gguf}: {g.nbytes / MIB:.1f} MiB; {threads} threads, context {CTX} ({args.logits_ctx} for the KL "
          f"divergence), each figure the best of {args.rounds} rounds\n")  # fmt: skip
    print("| runtime | peak RSS mapped MiB | peak RSS read MiB | predicted MiB "
          "| read ÷ (GGUF + KV + compute + output) | llama.cpp's buffers, read MiB "
          "| load s mapped | load s read |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stage in stages:
        a, b = best[(stage, "mapped")], best[(stage, "read")]
        print(f"| {stage} | {a['peak']:.1f} | {b['peak']:.1f} | {predicted[stage]:.0f} | {b['peak'] / work[stage]:.2f} "
              f"| {b['buffers']:.1f} | {a['load_s']:.2f} | {b['load_s']:.2f} |")  # fmt: skip
    if speed is None:
        return
    print("\n| llama-bench, best t/s | mapped | read |\n|---|---:|---:|")
    for test in ("pp", "tg"):
        print(f"| {test} | {speed[('mapped', test)]:.1f} | {speed[('read', test)]:.1f} |")


if __name__ == "__main__":
    run(main)
