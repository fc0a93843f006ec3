"""The OpenAI-compatible server, called with the official `openai` client over real HTTP.

Most tests run the server in this process (cpuforge.serve.server.Server in a thread of its own, on a
free loopback port, in front of the real pinned llama-server), so they can also look at its engine;
a few start scripts.serve as a user does. Every wait ends when the server answers or exits.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from helpers.llama import chat_ids, ids_answers, reference_answers
from helpers.models import chat_lesson
from helpers.serve import KEY, InProcess, client, start_server, wait_for_url
from helpers.vocab import VOCAB_PAIRS

from cpuforge.errors import InputError
from cpuforge.paths import model_name
from cpuforge.serve.app import is_page, make_app
from cpuforge.serve.engine import Engine, upstream_session
from cpuforge.serve.metrics import Metrics
from cpuforge.serve.server import Server, Settings

NAME = "chat-q4_0"  # results/chat/ggml-model-q4_0.gguf
QUESTIONS = [chat_lesson(start)[0] for start in (100, 300, 500, 700, 900, 1100, 1300, 1500)]


@pytest.fixture(scope="module")
def served(llama_bin, tiny_chat_model):
    """The tiny chat model served in this process with a key and four slots, as `--api-key KEY --parallel 4`."""
    gguf = tiny_chat_model / "ggml-model-q4_0.gguf"
    running = InProcess(Settings(gguf, llama_bin=llama_bin, port=0, api_key=KEY, threads=1, parallel=4)).ready()
    assert running.url.startswith("http://127.0.0.1:")
    yield running
    running.close()
    assert running.server.engine.process.returncode is not None  # llama-server stopped with it


@pytest.fixture(scope="module")
def server(served, tiny_chat_model):
    return served.url, tiny_chat_model / "ggml-model-q4_0.gguf"


@pytest.fixture(scope="module")
def answers(server):
    """What the model answers, greedily, to each question fed as transformers' ids."""
    _, gguf = server
    want = reference_answers(gguf, [[{"role": "user", "content": q}] for q in QUESTIONS])
    return dict(zip(QUESTIONS, want, strict=True))


def chat(c: openai.OpenAI, question: str, stream: bool = False, model: str = NAME) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        response = c.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
        assert response.model == NAME and response.usage.completion_tokens > 0
        return response.choices[0].message.content
    chunks = c.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.mark.llama
def test_models(server):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == [NAME]
    assert c.models.retrieve(NAME).id == NAME


@pytest.mark.llama
def test_chat_completions_answer_as_the_model_does_to_transformers_ids(server, answers):
    url, _ = server
    question = QUESTIONS[0]
    assert answers[question].strip()
    assert chat(client(url), question) == answers[question]
    assert chat(client(url), question, stream=True) == answers[question]


@pytest.mark.llama
def test_tools_the_template_cannot_show_are_left_out(server, answers):
    """What a chat page or an agent sends with every message: its tools. The tiny model's template never reads
    them, so the model is fed the conversation as in training, and answers as it does without them."""
    url, _ = server
    tool = {"type": "function", "function": {"name": "get_datetime", "description": "The local date and time.",
                                             "parameters": {"type": "object", "properties": {}}}}  # fmt: skip
    question = QUESTIONS[2]
    response = client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                   tools=[tool], temperature=0, max_tokens=32)  # fmt: skip
    assert response.choices[0].message.content == answers[question]
    assert not response.choices[0].message.tool_calls


@pytest.mark.llama
def test_completions_streamed_and_not(server):
    url, _ = server
    c = client(url)
    prompt = QUESTIONS[1]
    whole = c.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=16)
    assert whole.choices[0].text.strip() and whole.usage.completion_tokens <= 16
    chunks = c.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text


@pytest.mark.llama
def test_eight_concurrent_clients(server, answers):
    url, _ = server

    def one(i: int) -> str:
        return chat(client(url), QUESTIONS[i], stream=i % 2 == 1)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == [answers[q] for q in QUESTIONS]


@pytest.mark.llama
def test_a_client_that_leaves_mid_answer_harms_no_one(server, answers):
    url, _ = server
    c = client(url)
    chunks = c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTIONS[3]}], temperature=0, max_tokens=32, stream=True
    )
    next(iter(chunks))
    chunks.close()  # hang up after the first piece
    assert chat(c, QUESTIONS[3]) == answers[QUESTIONS[3]]


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.llama
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, answers):
    url, _ = server
    status, body = post(url, b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]

    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist; this server serves `chat-q4_0`"):
        chat(client(url), QUESTIONS[2], model="gpt-4")

    with pytest.raises(openai.BadRequestError, match="exceeds the available context size"):
        chat(client(url), "word " * 400)

    with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
        chat(client(url, key="wrong"), QUESTIONS[2])
    status, body = post(url, b"{}", key="")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    status, body = post(url.removesuffix("/v1") + "/v1/nothing/here", b"{}")
    assert status in (404, 405) and body["error"]["message"]

    assert chat(client(url), QUESTIONS[2]) == answers[QUESTIONS[2]]


@pytest.mark.llama
def test_the_cli_serves_until_sigint(llama_bin, tiny_chat_model, tmp_path, answers):
    """scripts.serve as a user starts it: flags parsed, the URL logged, an answer, and SIGINT ends it with 0."""
    log = tmp_path / "serve.log"
    gguf = tiny_chat_model / "ggml-model-q4_0.gguf"
    process = start_server(llama_bin, log, gguf, "--port", 0, "--api-key", KEY, "--threads", 1, "--parallel", 2,
                           "--no-webui")  # fmt: skip
    try:
        url = wait_for_url(process, log)
        assert url.startswith("http://127.0.0.1:")
        assert [m.id for m in client(url).models.list()] == [NAME]
        assert chat(client(url), QUESTIONS[6]) == answers[QUESTIONS[6]]
        status, _, body = get(url, "/", key=KEY)  # --no-webui: the API only
        assert status == 404 and json.loads(body)["error"]["message"] == "GET /: Not Found."
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait()
    text = log.read_text()
    assert code == 0, text
    assert "stopping: finishing the requests in flight" in text and "Traceback" not in text


@pytest.mark.unit
def test_bad_settings_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(InputError, match=r"^--parallel must be at least 1, got 0\.$"):
        Server(Settings(tmp_path / "model.gguf", parallel=0))
    with pytest.raises(InputError, match=r"^--restarts must be 0 or more, got -1\.$"):
        Server(Settings(tmp_path / "model.gguf", restarts=-1))
    with pytest.raises(InputError, match=r"--lora task: give NAME=FILE"):
        Server(Settings(tmp_path / "model.gguf", threads=1, llama_bin=tmp_path, loras=["task"]))
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'model.gguf'))}: file not found\.$"):
        Server(Settings(tmp_path / "model.gguf", threads=1, llama_bin=tmp_path))


@pytest.mark.unit
def test_the_proxys_own_answers_while_llama_server_is_down(tmp_path):
    """The app in process before any llama-server runs: what it answers itself (key, JSON, model name, unknown
    paths, /v1/models) it answers, what needs llama-server gets a 503 to retry, and /metrics counts each."""

    async def scenario() -> dict[str, float]:
        from aiohttp.test_utils import TestClient, TestServer

        sock = tmp_path / "llama-server.sock"  # nothing listens on it
        async with upstream_session(sock, "engine-key") as upstream:
            engine = Engine(["llama-server"], sock, "engine-key", upstream)
            async with TestClient(TestServer(make_app(upstream, NAME, KEY, engine, created=1))) as c:
                key = {"Authorization": f"Bearer {KEY}"}
                chat_body = {"messages": [{"role": "user", "content": "hi"}]}

                async def answer(method: str, path: str, status: int, **kwargs) -> dict:
                    async with c.request(method, path, **kwargs) as response:
                        assert response.status == status, await response.text()
                        if status == 503 and path != "/health":  # a request to retry, not a state
                            assert response.headers["Retry-After"] == "2"
                        return await response.json()

                assert await answer("GET", "/health", 503) == {"status": "unavailable"}  # no key needed
                assert await answer("GET", "/v1/models", 200, headers=key) == {"object": "list", "data": [
                    {"id": NAME, "object": "model", "created": 1, "owned_by": "cpuforge"}]}  # fmt: skip
                wrong = await answer("GET", "/v1/models", 401, headers={"Authorization": "Bearer wrong"})
                assert wrong["error"]["code"] == "invalid_api_key"
                bad = await answer("POST", "/v1/chat/completions", 400, data=b'{"messages": [', headers=key)
                assert bad["error"]["message"].startswith("The request body is not valid JSON")
                other = await answer("POST", "/v1/completions", 404, json={"model": "gpt-4", "prompt": "hi"},
                                     headers=key)  # fmt: skip
                assert other["error"] == {"message": f"The model `gpt-4` does not exist; this server serves `{NAME}`.",
                                          "type": "invalid_request_error", "param": None, "code": "model_not_found"}
                down = await answer("POST", "/v1/chat/completions", 503, json=chat_body, headers=key)
                assert down["error"]["type"] == "unavailable_error" and down["error"]["code"] == "engine_unavailable"
                await answer("GET", "/favicon.svg", 503)  # a page: no key needed, but llama-server serves it
                await answer("GET", "/slots", 404, headers=key)
                async with c.get("/metrics", headers=key) as response:
                    text = await response.text()
        return text

    text = asyncio.run(scenario())
    assert metric(text, "cpuforge_llama_server_ready") == 0
    assert metric(text, "cpuforge_llama_server_restarts_total") == 0
    assert "llamacpp:" not in text  # llama-server's own figures only when it is up
    for reason, n in {"invalid_api_key": 1, "invalid_json": 1, "model_not_found": 1, "engine_unavailable": 2,
                      "unknown_path": 1}.items():  # fmt: skip
        assert metric(text, f'cpuforge_rejected_total{{reason="{reason}"}}') == n, reason
    for endpoint, status, n in [("/health", 503, 1), ("/v1/models", 200, 1), ("/v1/models", 401, 1),
                                ("/v1/chat/completions", 400, 1), ("/v1/chat/completions", 503, 1),
                                ("/v1/completions", 404, 1), ("page", 503, 1), ("other", 404, 1)]:  # fmt: skip
        assert metric(text, f'cpuforge_requests_total{{endpoint="{endpoint}",status="{status}"}}') == n


@pytest.mark.unit
def test_only_web_ui_files_pass_for_pages():
    """A page is served without the key: no API path may pass for one."""
    assert is_page("/") and is_page("/favicon.svg") and is_page("/_app/immutable/entry/start.js")
    for path in ("/v1/models", "/props", "/slots", "/metrics", "/health", "/v1/chat/completions", "/_app/../x.js",
                 "/../etc/passwd.txt"):  # fmt: skip
        assert not is_page(path), path


@pytest.mark.unit
def test_model_name():
    assert model_name(Path("results/demo/ggml-model-q4_0.gguf")) == "demo-q4_0"
    assert model_name(Path("/models/llama-7b.Q4_K_M.gguf")) == "llama-7b.Q4_K_M"


@pytest.mark.llama
def test_busy_port_is_refused_with_one_sentence(llama_bin, tiny_chat_model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "serve.log"
        process = start_server(llama_bin, log, tiny_chat_model / "ggml-model-q4_0.gguf", "--port", port, "--threads", 1)
        assert process.wait() == 2
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)." in log.read_text()


@pytest.mark.llama
def test_missing_model_is_refused(llama_bin, tmp_path):
    log = tmp_path / "serve.log"
    process = start_server(llama_bin, log, tmp_path / "nope.gguf", "--port", 0, "--threads", 1)
    assert process.wait() == 2
    assert f"{tmp_path / 'nope.gguf'}: file not found." in log.read_text()


def get(url: str, path: str, key: str = KEY) -> tuple[int, str, str]:
    request = urllib.request.Request(url.removesuffix("/v1") + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def metric(text: str, sample: str) -> float:
    """A sample's value in /metrics text. A labelled counter that has counted nothing yet has no sample (Prometheus'
    way), so it reads 0 when its family is there; any other missing sample fails the test."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    if match:
        return float(match[1])
    family = sample.partition("{")[0]
    if "{" in sample and re.search(rf"^# TYPE {re.escape(family)} counter$", text, re.M):
        return 0.0
    raise AssertionError(f"no sample {sample} in /metrics:\n{text}")


@pytest.mark.llama
def test_metrics_count_requests_rejections_and_llama_servers_tokens(served):
    url = served.url
    assert get(url, "/metrics", key="wrong")[0] == 401
    status, kind, before = get(url, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    for line in before.splitlines():  # Prometheus' text format: comments, and one sample a line
        assert re.fullmatch(r'# (HELP|TYPE) \S+ .+|[a-zA-Z_:][\w:]*(\{\w+="[^"]*"(,\w+="[^"]*")*\})? \S+', line), line

    answered = 'cpuforge_requests_total{endpoint="/v1/chat/completions",status="200"}'
    bad_json = 'cpuforge_rejected_total{reason="invalid_json"}'
    wrong_key = 'cpuforge_rejected_total{reason="invalid_api_key"}'
    response = client(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTIONS[4]}], temperature=0, max_tokens=8
    )
    post(url, b'{"messages": [')
    post(url, b"{}", key="wrong")
    _, _, after = get(url, "/metrics")
    assert metric(after, answered) == metric(before, answered) + 1
    assert metric(after, bad_json) == metric(before, bad_json) + 1
    assert metric(after, wrong_key) == metric(before, wrong_key) + 1
    predicted = "llamacpp:tokens_predicted_total"  # llama-server's own, through the same endpoint
    assert metric(after, predicted) == metric(before, predicted) + response.usage.completion_tokens
    # the gauges say what the engine itself says: loaded, and never restarted in this module
    engine = served.server.engine
    assert engine.ready and engine.restarts == 0 and engine.process.returncode is None
    assert metric(after, "cpuforge_llama_server_ready") == 1
    assert metric(after, "cpuforge_llama_server_restarts_total") == 0
    assert metric(after, "cpuforge_requests_in_flight") == 1  # this /metrics call


@pytest.mark.unit
def test_a_metric_missing_from_metrics_fails_the_test():
    """The positive control of metric(): a sample that is not there is a failure, never a silent 0."""
    text = Metrics(Engine([], Path("unused.sock"), "key", upstream=None)).text()
    assert metric(text, "cpuforge_llama_server_restarts_total") == 0
    assert metric(text, 'cpuforge_rejected_total{reason="invalid_json"}') == 0  # a counter with nothing counted
    for missing in ("cpuforge_llama_server_restart_total", "llamacpp:tokens_predicted_total",
                    'cpuforge_rejcted_total{reason="invalid_json"}'):  # fmt: skip
        with pytest.raises(AssertionError, match="no sample"):
            metric(text, missing)


def raw_request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request sent as written, path included (urllib would not send `/../` as it is)."""
    import http.client

    host, port = url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    return response.status, response.read()


ODD_REQUESTS = [
    ("GET", "/../../etc/passwd", None),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", None),
    ("GET", "/_app/../../../etc/passwd.txt", None),
    ("GET", "/_app/immutable/nothing.js", None),
    ("GET", "/slots", None),
    ("POST", "/", b"{}"),
    ("POST", "/props", b"{}"),
    ("DELETE", "/v1/models", None),
    ("POST", "/v1/chat/completions", b'{"messages": "hello"}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}'),
    ("POST", "/v1/chat/completions", b"[1, 2, 3]"),
    ("POST", "/v1/chat/completions", b"\xff\xfe"),
    ("POST", "/v1/completions", b'{"prompt": [999999999, -1], "max_tokens": 4}'),
    ("POST", "/v1/completions", b'{"prompt": {"a": 1}}'),
    ("POST", "/v1/completions", b'{"prompt": "hi", "model": ["x"]}'),
]


@pytest.mark.llama
@pytest.mark.parametrize("method,path,body", ODD_REQUESTS)
def test_odd_requests_get_a_4xx_and_never_a_5xx(server, answers, method, path, body):
    url, _ = server
    status, reply = raw_request(url, method, path, body)
    assert 400 <= status < 500, (status, reply)
    assert b"root:" not in reply
    assert chat(client(url), QUESTIONS[5]) == answers[QUESTIONS[5]]
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
TURNS = ["What is the capital of France?", "And the capital of Spain?"]


@pytest.mark.llama
@pytest.mark.parametrize("pair", VOCAB_PAIRS)
def test_server_feeds_transformers_ids_multi_turn(llama_bin, vocab_models, pair):
    """Real vocabularies and templates, two turns with a system prompt, streamed and not: the server answers
    as llama-cpp-python does to transformers' ids, and its usage counts those ids."""
    gguf = vocab_models[pair]
    running = InProcess(Settings(gguf, llama_bin=llama_bin, port=0, threads=1, parallel=1)).ready()
    try:
        c = client(running.url)
        name = model_name(gguf)
        conversation = [SYSTEM]
        for turn, question in enumerate(TURNS):
            conversation.append({"role": "user", "content": question})
            (ids,) = chat_ids(gguf.parent / "merged", [conversation])
            (want,) = ids_answers(gguf, [ids], max_tokens=16, errors="replace")
            whole = c.chat.completions.create(model=name, messages=conversation, temperature=0, max_tokens=16)
            assert whole.choices[0].message.content == want
            assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens <= 16
            chunks = list(c.chat.completions.create(model=name, messages=conversation, temperature=0, max_tokens=16,
                                                    stream=True, stream_options={"include_usage": True}))  # fmt: skip
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
            assert chunks[-1].usage.prompt_tokens == len(ids) and not chunks[-1].choices
            conversation.append({"role": "assistant", "content": want})
    finally:
        running.close()  # raises what the server raised, if anything


@pytest.mark.llama
def test_llama_server_evaluates_the_ids_the_proxy_sends(llama_bin, vocab_models):
    """Straight to the pinned llama-server: /completion given the proxy's body evaluates exactly those ids (its
    `prompt` is their detokenization, its count theirs), where its own chat endpoint evaluates llama.cpp's."""
    from cpuforge.serve.completions import completion_request
    from cpuforge.text.prompt import ChatPrompt

    gguf = vocab_models["llama2-spm"]
    conversation = [SYSTEM, {"role": "user", "content": "bank"}, {"role": "assistant", "content": "merger"},
                    {"role": "user", "content": "report"}]  # fmt: skip
    (ids,) = chat_ids(gguf.parent / "merged", [conversation])
    request = {"messages": conversation, "max_tokens": 8, "temperature": 0}
    body = completion_request(request, ChatPrompt(gguf.parent / "merged"))
    assert body["prompt"] == ids and body["stop"] == ["</s>"]
    port = free_port()
    command = [str(llama_bin / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", "1", "-c", "512", "--no-webui", "--offline"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        while process.poll() is None and not ready(base):
            time.sleep(0.1)
        answer = call(f"{base}/completion", body)
        assert answer["tokens_evaluated"] == len(ids)
        assert answer["prompt"] == call(f"{base}/detokenize", {"tokens": ids})["content"]
        own_text = call(f"{base}/apply-template", {"messages": conversation})["prompt"]
        own = call(f"{base}/tokenize", {"content": own_text, "add_special": True, "parse_special": True})["tokens"]
        assert own != ids  # what llama-server's own chat endpoint would have evaluated
        assert answer["prompt"] != call(f"{base}/detokenize", {"tokens": own})["content"]
        (want,) = ids_answers(gguf, [ids], max_tokens=8, errors="replace")
        assert answer["content"] == want
    finally:
        process.terminate()
        process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health") as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def call(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())
