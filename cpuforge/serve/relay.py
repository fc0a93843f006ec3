"""Relaying to llama-server: its answer passed back byte for byte, streamed as it comes, and a clean
503 in the OpenAI shape when it is gone."""

from __future__ import annotations

import contextlib
import logging

import aiohttp
from aiohttp import web

from cpuforge.serve.errors import GONE, GONE_EVENT, unavailable

log = logging.getLogger(__name__)

# headers of a page asset that the browser needs back: gzip, caching and the page's isolation policy
PAGE_HEADERS = ("Content-Type", "Content-Encoding", "ETag", "Cache-Control",
                "Cross-Origin-Embedder-Policy", "Cross-Origin-Opener-Policy")  # fmt: skip


class ClientGone(Exception):
    """The client closed its connection while we wrote to it."""


async def client_write(response: web.StreamResponse, data: bytes) -> None:
    # a write to a client that left raises ConnectionResetError, which aiohttp also makes a ClientError:
    # told apart here from llama-server going away
    try:
        await response.write(data)
    except ConnectionResetError:
        raise ClientGone from None


async def relay(request: web.Request, upstream, engine, method: str, path: str, **kwargs) -> web.StreamResponse:
    """llama-server's answer to this call, streamed back as it comes; a 503 in the OpenAI shape if it is gone."""
    if not engine.ready:
        return unavailable()
    response = None
    try:
        async with upstream.request(method, path, **kwargs) as answer:
            if answer.content_type != "text/event-stream":
                # a whole answer comes at once: read before replying, so a death midway is a clean 503
                body = await answer.read()
                return web.Response(status=answer.status, body=body, content_type=answer.content_type,
                                    charset=answer.charset)  # fmt: skip
            response = web.StreamResponse(status=answer.status, headers={"Cache-Control": "no-cache"})
            response.content_type = answer.content_type
            response.charset = answer.charset
            await response.prepare(request)
            # pass llama-server's bytes on as they arrive: a streamed token leaves here when it leaves there
            async for chunk in answer.content.iter_any():
                await client_write(response, chunk)
            await response.write_eof()
    except ClientGone:
        # the client left: leaving the `async with` closed the upstream connection too, and llama-server
        # stops generating for it
        log.info("%s: client went away mid-answer", request.path)
    except aiohttp.ClientError as e:  # llama-server died before or while it answered
        log.warning("%s: llama-server went away mid-answer (%s)", request.path, e.__class__.__name__)
        if response is None:
            return unavailable(GONE)
        with contextlib.suppress(ClientGone):
            await client_write(response, GONE_EVENT)
    return response


async def page_file(request: web.Request, upstream) -> tuple[int, bytes, dict[str, str]] | None:
    """A file of llama-server's web UI as it sends it (gzip and cache headers included): status, body and
    the headers the browser needs; None when llama-server is gone."""
    headers = {k: request.headers[k] for k in ("Accept-Encoding", "If-None-Match") if k in request.headers}
    try:
        async with upstream.get(request.rel_url.raw_path, headers=headers) as answer:
            body = await answer.read()
            kept = {k: answer.headers[k] for k in PAGE_HEADERS if k in answer.headers}
            return answer.status, body, kept
    except aiohttp.ClientError:
        return None
