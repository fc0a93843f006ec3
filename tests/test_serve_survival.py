"""The server when its engine dies and when it is told to stop: the real llama-server, killed for real.

The restart runs in this process, where the engine itself can be asked for its pids and restarts; what
only the process shows (its exit code, its signals) is tested on scripts.serve started as a user does.
Every wait is bounded only to turn a hang into a failure; no test asserts how long anything took.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from helpers.models import chat_lesson
from helpers.serve import KEY, InProcess, client, start_server, wait_for_url

from cpuforge.serve.server import Settings

QUESTION = chat_lesson(100)[0]
GUARD = 300  # seconds: a hang guard, never a speed limit


def engine_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"llama-server started \(pid (\d+)\)", log.read_text())]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def get(url: str, path: str, key: str = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url.removesuffix("/v1") + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=GUARD) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def until(condition, what: str):
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def answer(url: str, **extra) -> str:
    response = client(url).chat.completions.create(
        model="chat-q4_0", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32, **extra
    )
    return response.choices[0].message.content


@pytest.fixture
def launch(llama_bin, tmp_path):
    """Start scripts.serve as a user does: (process, log, URL) once it serves; killed at the end if still up."""
    started = []

    def launch(gguf: Path, *args):
        log = tmp_path / f"serve-{len(started)}.log"
        started.append(start_server(llama_bin, log, gguf, "--port", 0, "--threads", 1, *args))
        return started[-1], log, wait_for_url(started[-1], log)

    yield launch
    for process in started:
        if process.poll() is None:  # a failed test: the kernel then stops its llama-server too (PDEATHSIG)
            process.kill()
            process.wait()


@pytest.fixture
def gguf(tiny_chat_model, tmp_path) -> Path:
    # a copy of its own, named as the workflow names it, that a test may break
    folder = tmp_path / "chat"
    folder.mkdir()
    return Path(shutil.copy(tiny_chat_model / "ggml-model-q4_0.gguf", folder))


@pytest.mark.llama
def test_killed_llama_server_is_restarted_and_requests_in_flight_get_a_503(llama_bin, gguf, caplog, capsys):
    caplog.set_level(logging.INFO, logger="cpuforge.serve")
    # slots of 4096 tokens: an answer of thousands of tokens is still streaming when the engine is killed
    settings = Settings(gguf, llama_bin=llama_bin, port=0, api_key=KEY, threads=1, parallel=2, ctx_size=4096)
    running = InProcess(settings).ready()
    engine, url = running.server.engine, running.url
    try:
        before = answer(url)
        assert before.strip()
        first = engine.process.pid

        stream = client(url).chat.completions.create(
            model="chat-q4_0", messages=[{"role": "user", "content": QUESTION}], max_tokens=4000, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        pieces = iter(stream)
        next(pieces)
        os.kill(first, signal.SIGSTOP)  # frozen mid-answer; a request sent now waits inside it
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(answer, url)
            until(lambda: in_flight(url) == 3, "the proxy to take the request")  # it, the stream and this call
            killed = time.monotonic()
            os.kill(first, signal.SIGKILL)  # what the out-of-memory killer does
            with pytest.raises(openai.APIError, match="llama-server stopped while answering this request"):
                for _ in pieces:
                    pass
            with pytest.raises(openai.InternalServerError) as failed:
                waiting.result(timeout=GUARD)
        assert failed.value.status_code == 503 and failed.value.body["code"] == "engine_unavailable"

        states = [(0.0, "killed")]

        def healthy():
            status, body = get(url, "/health", key="")
            state = json.loads(body)["status"]
            assert (status == 200) == (state == "ok")
            if state != states[-1][1]:
                states.append((time.monotonic() - killed, state))
            return state == "ok"

        until(healthy, "/health to say ok again")
        assert states[1][1] == "unavailable"  # first seen as down, whatever came between
        assert answer(url) == before  # the same greedy answer from the new llama-server
        second = engine.process.pid
        assert second != first and alive(second) and not alive(first)
        assert engine.restarts == 1

        status, metrics = get(url, "/metrics")
        assert status == 200 and "cpuforge_llama_server_restarts_total 1\n" in metrics.decode()
        assert re.search(r'cpuforge_rejected_total\{reason="engine_unavailable"\} [1-9]', metrics.decode())
    finally:
        running.close()
    assert not alive(first) and not alive(engine.process.pid)
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("cpuforge.serve")]
    timeline = [line for line in logged if re.search("llama-server|serving", line.partition(": ")[2])]
    with capsys.disabled():
        print("\nrestart timeline (log):", *timeline, sep="\n  ")
        print("states seen on /health, seconds after the kill:", ", ".join(f"{s} {t:.2f}" for t, s in states))


@pytest.mark.llama
def test_a_model_that_no_longer_loads_ends_the_server_with_one_sentence(launch, gguf):
    process, log, _ = launch(gguf, "--restarts", 2)
    (pid,) = engine_pids(log)
    gguf.write_bytes(gguf.read_bytes()[:4096])  # the file cut short, as by a full disk or a copy in progress
    os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=GUARD) == 1
    text = log.read_text()
    assert len(engine_pids(log)) == 3, text  # the first and two restarts
    assert re.search(
        r"ERROR __main__: llama-server died with signal SIGKILL and could not be restarted: 2 attempts in a row failed,"
        r" the last because llama-server exited with exit code 1 before it was ready; see its log above\.\n$",
        text,
    ), text
    assert not any(alive(p) for p in engine_pids(log))


def half_sent_request(url: str) -> socket.socket:
    """A chat request whose body is only half sent: in flight in the proxy, waiting for the rest."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 32})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD)
    sock.sendall(head.encode() + body[:10].encode())
    return sock


def in_flight(url: str) -> int:
    return int(re.search(r"^cpuforge_requests_in_flight (\d+)$", get(url, "/metrics")[1].decode(), re.M)[1])


def refused(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=GUARD).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.llama
def test_sigterm_lets_requests_in_flight_finish_then_stops_both(launch, gguf):
    process, log, url = launch(gguf, "--api-key", KEY, "--parallel", 1, "--ctx-size", 4096, "--drain-timeout", GUARD)
    (pid,) = engine_pids(log)
    stream = client(url).completions.create(
        model="chat-q4_0", prompt=QUESTION, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    pieces = iter(stream)
    next(pieces)
    os.kill(pid, signal.SIGSTOP)  # the answer frozen a few tokens in, so it is surely in flight at the SIGTERM
    until(lambda: in_flight(url) == 2, "the answer to be in flight")  # it, and the /metrics call
    process.send_signal(signal.SIGTERM)
    until(lambda: refused(url), "the proxy to stop listening")  # no new requests while it drains
    os.kill(pid, signal.SIGCONT)
    finish = [chunk.choices[0].finish_reason for chunk in pieces if chunk.choices]
    assert finish[-1] == "length"  # answered to the last of its 4000 tokens
    assert process.wait(timeout=GUARD) == 0
    assert "stopping: finishing the requests in flight" in log.read_text()
    assert not any(alive(p) for p in engine_pids(log))


@pytest.mark.llama
def test_a_request_that_never_finishes_is_cut_off_after_the_drain_timeout(launch, gguf):
    process, log, url = launch(gguf, "--api-key", KEY, "--drain-timeout", 1)
    sock = half_sent_request(url)  # and the rest never comes
    until(lambda: in_flight(url) == 2, "the proxy to take the half-sent request")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=GUARD) == 0
    assert sock.recv(65536) == b""  # closed without an answer
    assert not any(alive(p) for p in engine_pids(log))
