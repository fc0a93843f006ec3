"""The proxy's HTTP application: routes, and what each request gets before (or instead of) llama-server.

It answers what llama-server gets wrong for an OpenAI client: malformed JSON (llama-server says 500),
a model name it does not serve (llama-server ignores the name) and a wrong API key (checked here, so a
bad request never reaches the model). A chat request is rendered and tokenized here and sent to
llama-server as token ids (cpuforge.serve.completions); everything else, errors included, is relayed
as llama-server answers it (cpuforge.serve.relay).
"""

from __future__ import annotations

import hmac
import json
import logging
import time

import aiohttp
from aiohttp import web

from cpuforge.serve import completions
from cpuforge.serve.adapters import ModelTable
from cpuforge.serve.errors import GONE, error, unavailable
from cpuforge.serve.metrics import CONTENT_TYPE, Metrics
from cpuforge.serve.relay import page_file, relay

log = logging.getLogger(__name__)

# bodies larger than this are refused with a 413: a full 128k-token prompt is well under it
MAX_BODY = 16 << 20
FORWARDED = ("/v1/chat/completions", "/v1/completions")
# what the web UI asks of llama-server besides the chat itself: its settings and the model's context size
PAGE_API = ("/props",)
# aiohttp's own refusals (unknown path or method, body too large), as /metrics names them
HTTP_REASONS = {404: "unknown_path", 405: "unknown_path", 413: "body_too_large"}


def is_page(path: str) -> bool:
    """A file of the web UI: `/`, or a name with a dot (`/_app/…/bundle.js`, `/favicon.svg`).

    llama-server's API paths have no dot in them, so none of them passes for a page and escapes the key.
    """
    return (path == "/" or "." in path.rsplit("/", 1)[-1]) and ".." not in path.split("/")


class Proxy:
    """The request handlers and what they share: the connection to llama-server, the served names, the key.

    `upstream` is an aiohttp.ClientSession whose requests reach llama-server (base URL http://llama);
    `table` names the base and its adapters (default: the base alone).
    `prompt` (a cpuforge.text.prompt.ChatPrompt) renders and tokenizes chat requests, None leaves them to
    llama-server.
    """

    def __init__(self, upstream, name: str, api_key: str | None, engine, webui: bool = True,
                 created: int | None = None, table: ModelTable | None = None, prompt=None):  # fmt: skip
        self.upstream, self.name, self.api_key, self.engine, self.webui = upstream, name, api_key, engine, webui
        self.created = created or int(time.time())
        self.table = table or ModelTable.build(name, [])
        self.prompt = prompt
        self.served = ", ".join(f"`{m}`" for m in self.table.names())
        self.metrics = Metrics(engine)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.counted], client_max_size=MAX_BODY)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.one_model)
        for path in FORWARDED:
            app.router.add_post(path, self.forward)
        for path in PAGE_API:
            app.router.add_get(path, self.props)
        app.router.add_get("/{path:.*}", self.page)
        return app

    @web.middleware
    async def counted(self, request: web.Request, handler) -> web.StreamResponse:
        """Every request, counted in /metrics by endpoint and status once it is answered."""
        self.metrics.in_flight += 1
        try:
            response = await self.checked(request, handler)
        finally:
            self.metrics.in_flight -= 1
        route = request.match_info.route.resource
        # a fixed label per route, so that odd paths cannot grow the metrics without end
        if route is None or route.canonical == "/{path}":
            endpoint = "page" if self.webui and is_page(request.path) else "other"
        else:
            endpoint = route.canonical
        self.metrics.count(endpoint, response.status, response.get("rejected"))
        return response

    async def checked(self, request: web.Request, handler) -> web.StreamResponse:
        """The key first (not for /health and the web UI's files), then the route's handler; aiohttp's own
        refusals in the same JSON shape as every other error."""
        public = request.path == "/health" or (
            self.webui and request.method in ("GET", "HEAD") and is_page(request.path)
        )
        if self.api_key is not None and not public:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return error(401, "Invalid API key: send `Authorization: Bearer <key>`.", code="invalid_api_key",
                             reason="invalid_api_key")  # fmt: skip
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                reason = HTTP_REASONS.get(e.status, "bad_request")
                return error(e.status, f"{request.method} {request.path}: {e.reason}.", reason=reason)
            raise

    async def health(self, request: web.Request) -> web.Response:
        state = await self.engine.state()
        return web.json_response({"status": state}, status=200 if state == "ok" else 503)

    def model_card(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": self.created, "owned_by": "cpuforge"}

    def unknown_model(self, model) -> web.Response:
        return error(404, f"The model `{model}` does not exist; this server serves {self.served}.",
                     code="model_not_found", reason="model_not_found")  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card(m) for m in self.table.names()]})

    async def one_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        return web.json_response(self.model_card(model)) if model in self.table else self.unknown_model(model)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """A completion: checked here, then answered from token ids (a plain chat) or relayed to llama-server."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"The request body is not valid JSON ({e}).", reason="invalid_json")
        if not isinstance(body, dict):
            return error(400, "The request body must be a JSON object.", reason="invalid_json")
        if body.get("model", self.name) not in self.table:
            return self.unknown_model(body["model"])
        if request.path == "/v1/chat/completions" and self.prompt is not None:
            if (why := completions.needs_llama_server(body, self.prompt)) is None:
                return await self.chat_from_ids(request, body)
            log.info("a chat request with %s: through llama-server's own template", why)
        data = self.table.request_body(body, raw)  # the model's adapters, as llama-server's per-request `lora`
        return await relay(request, self.upstream, self.engine, "POST", request.path, data=data,
                           headers={"Content-Type": "application/json"})  # fmt: skip

    async def chat_from_ids(self, request: web.Request, body: dict) -> web.StreamResponse:
        """A chat rendered and tokenized by the model's own template and tokenizer, sent as ids."""
        if body.get("tools") and not self.prompt.renders_tools:
            log.info("a chat request with tools: the chat template does not render them, so they are left out")
        if not self.engine.ready:
            return unavailable()
        try:  # the model's adapters ride along as llama-server's per-request `lora`
            return await completions.respond(request, self.upstream, self.table.with_lora(body), self.prompt,
                                             body.get("model", self.name))  # fmt: skip
        except aiohttp.ClientError as e:  # llama-server died before it answered
            log.warning("%s: llama-server went away (%s)", request.path, e.__class__.__name__)
            return unavailable(GONE)

    async def props(self, request: web.Request) -> web.StreamResponse:
        return await relay(request, self.upstream, self.engine, "GET", request.path)

    async def prometheus(self, request: web.Request) -> web.Response:
        text = await self.metrics.scrape(self.upstream)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def page(self, request: web.Request) -> web.Response:
        """A file of llama-server's web UI, passed through as it is (gzip and cache headers included)."""
        if not (self.webui and is_page(request.path)):
            return error(404, f"{request.method} {request.path}: Not Found.", reason="unknown_path")
        if not self.engine.ready:
            return unavailable()
        fetched = await page_file(request, self.upstream)
        if fetched is None:
            return unavailable()
        status, body, headers = fetched
        if request.path == "/" and status == 404:
            return error(404, "This llama-server was built without its web UI (llama.cpp's LLAMA_BUILD_UI); "
                              "the API is at /v1.", reason="unknown_path")  # fmt: skip
        return web.Response(status=status, body=body, headers=headers)


def make_app(upstream, name: str, api_key: str | None, engine, webui: bool = True, created: int | None = None,
             table: ModelTable | None = None, prompt=None) -> web.Application:  # fmt: skip
    """The proxy's aiohttp application (see Proxy for the arguments)."""
    return Proxy(upstream, name, api_key, engine, webui, created, table, prompt).app()
