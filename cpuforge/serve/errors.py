"""Errors in the OpenAI API's shape, which its clients turn into typed exceptions with the message.

aiohttp is imported where a response is made: cpuforge.serve.completions uses these and is imported by
checks that run in a rule's environment, which has no aiohttp.
"""

from __future__ import annotations

import json

NOT_READY = "llama-server is not ready (loading the model, or being restarted); try again shortly."
GONE = "llama-server stopped while answering this request; it is being restarted."
# llama-server died while an answer streamed: its status is out already, so an error event, which OpenAI
# clients raise as an APIError
GONE_EVENT = b"data: " + json.dumps({"error": {
    "message": "llama-server stopped while answering this request.", "type": "unavailable_error",
    "code": "engine_unavailable",
}}).encode() + b"\n\n"  # fmt: skip


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          reason: str | None = None):  # fmt: skip
    """An error response: {"error": {"message", "type", "param", "code"}}.

    `reason` names a request refused before it reached llama-server, for /metrics.
    """
    from aiohttp import web

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = web.json_response(body, status=status)
    response["rejected"] = reason
    return response


def unavailable(message: str = NOT_READY):
    """A 503 that tells the client to come back: llama-server is loading, restarting, or died mid-request."""
    response = error(503, message, kind="unavailable_error", code="engine_unavailable", reason="engine_unavailable")
    response.headers["Retry-After"] = "2"
    return response
