"""OpenAI chat completions served from token ids: the server's half of the one prompt path.

llama-server renders a chat request with its own template engine and tokenizes the
text with llama.cpp's tokenizer, which for a sentencepiece vocabulary is not what
the model was trained on (a `▁` after every special token the template writes,
llama.cpp #8584). So the proxy renders and tokenizes the conversation itself
(cpuforge.text.prompt.ChatPrompt: the merged model's template and tokenizer, as
transformers applies them), sends the ids to llama-server's `/completion`, which
evaluates a token array as it is, and turns the answer back into the OpenAI chat
shape, streamed (`chat.completion.chunk` events, `[DONE]`) or whole, with usage.

The sampling fields are llama-server's own (its /completion reads the OpenAI names:
temperature, top_p, max_tokens, seed, stop, …), passed on as they came; `stop` gains
the template's stop text, and generation also ends at every end-of-generation token.
What only llama-server's chat parser does goes to its own chat endpoint as before:
tools for a template that renders them (tool-call parsing), content given as parts, continuing a final
assistant message. Tools sent to a model whose template never reads them are left out, as transformers leaves
them out: a chat page or agent that always sends its tools gets the answer the model gives to the conversation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time

from jinja2 import TemplateError

from cpuforge.errors import InputError
from cpuforge.serve.errors import GONE_EVENT, error

log = logging.getLogger(__name__)


# request fields this module answers itself; the rest are llama-server's sampling settings
OWN_FIELDS = ("messages", "stream", "response_format", "logprobs", "top_logprobs", "add_generation_prompt",
              "chat_template_kwargs", "tools", "tool_choice")  # fmt: skip


def needs_llama_server(body: dict, prompt) -> str | None:
    """Why a request must go to llama-server's own chat endpoint (its template and tokenizer), or None.

    Tools go there only when the model's template renders them (and llama-server parses the calls): for a
    template that never reads `tools`, llama-server would write a tool prompt of its own that the model never
    saw in training, so the conversation is rendered without them, as transformers renders it.
    """
    if body.get("tools") and body.get("tool_choice", "auto") != "none" and prompt.renders_tools:
        return "tools"
    if body.get("continue_final_message"):
        return "continue_final_message"
    conversation = body.get("messages")
    if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
        return None  # completion_request says what is wrong
    if conversation and conversation[-1].get("role") == "assistant":
        return "a final assistant message to continue"
    if any(not isinstance(m.get("content"), str | None) for m in conversation):
        return "content given as parts"
    return None


def json_schema(body: dict) -> dict | None:
    """response_format as llama-server's chat endpoint reads it: a JSON schema the answer must follow."""
    form = body.get("response_format")
    if not isinstance(form, dict) or form.get("type") in (None, "text"):
        return None
    if form["type"] == "json_object":
        schema = form.get("schema") or {}
    elif form["type"] == "json_schema":
        schema = (form.get("json_schema") or {}).get("schema") or {}
    else:
        raise InputError(f'response_format type must be "text", "json_object" or "json_schema", not {form["type"]!r}.')
    return schema or {"type": "object"}


def completion_request(body: dict, prompt) -> dict:
    """The /completion body for an OpenAI chat request: the conversation's ids as `prompt`, the sampling
    fields as they came. Raises InputError (a 400) when the conversation cannot be rendered."""
    conversation = body.get("messages")
    if not isinstance(conversation, list) or not conversation or not all(isinstance(m, dict) for m in conversation):
        raise InputError("`messages` must be a non-empty list of messages.")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InputError("`chat_template_kwargs` must be an object.")
    try:
        ids = prompt.ids(conversation, body.get("add_generation_prompt", True), **kwargs)
    except (TemplateError, TypeError, KeyError) as e:  # the template refuses it, or a message lacks a field
        raise InputError(f"the chat template cannot render these messages: {e}") from None
    out = {k: v for k, v in body.items() if k not in OWN_FIELDS} | {"prompt": ids, "stream": bool(body.get("stream"))}
    stop = body.get("stop") or []
    out["stop"] = [*([stop] if isinstance(stop, str) else stop), *prompt.stop]
    schema = json_schema(body)
    if schema is not None:
        out["json_schema"] = schema
    if body.get("logprobs"):
        out["n_probs"] = body.get("top_logprobs") or 20
    return out


def finish_reason(result: dict) -> str:
    return "stop" if result.get("stop_type") in ("eos", "word") else "length"


def usage(result: dict) -> dict:
    prompt, completion = result.get("tokens_evaluated", 0), result.get("tokens_predicted", 0)
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}


class Translation:
    """One chat request's answer, from /completion's shape to the OpenAI chat shape."""

    def __init__(self, name: str, include_usage: bool = False):
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.name = name
        self.created = int(time.time())
        self.include_usage = include_usage
        self.started: set[int] = set()

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.name}

    def whole(self, answer: dict | list) -> dict:
        """A non-streamed /completion answer (one result, or one per choice when n > 1) as a chat.completion."""
        results = answer if isinstance(answer, list) else [answer]
        choices = []
        for i, r in enumerate(results):
            choice = {"index": r.get("index", i), "message": {"role": "assistant", "content": r.get("content", "")},
                      "finish_reason": finish_reason(r), "logprobs": None}  # fmt: skip
            if r.get("completion_probabilities"):
                choice["logprobs"] = {"content": r["completion_probabilities"]}
            choices.append(choice)
        total = usage(results[0])
        total["completion_tokens"] = sum(usage(r)["completion_tokens"] for r in results)
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        out = self.head("chat.completion") | {"choices": choices, "usage": total}
        if results[-1].get("timings"):
            out["timings"] = results[-1]["timings"]
        return out

    def chunk(self, index: int, delta: dict, reason: str | None = None, logprobs=None) -> dict:
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        return self.head("chat.completion.chunk") | {"choices": [choice]}

    def events(self, result: dict) -> list[dict]:
        """The chat.completion.chunk events for one streamed /completion event."""
        if "error" in result:
            return [result]
        index = result.get("index", 0)
        out = []
        if index not in self.started:  # OpenAI's stream opens each choice with the role
            self.started.add(index)
            out.append(self.chunk(index, {"role": "assistant", "content": None}))
        probs = result.get("completion_probabilities")
        if result.get("content") or probs:
            out.append(
                self.chunk(
                    index, {"content": result.get("content", "")}, logprobs={"content": probs} if probs else None
                )
            )
        if result.get("stop"):
            out.append(self.chunk(index, {}, finish_reason(result)))
            if self.include_usage:
                out.append(self.head("chat.completion.chunk") | {"choices": [], "usage": usage(result)})
            if result.get("timings"):
                out[-1]["timings"] = result["timings"]
        return out


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def post_completion(upstream, completion: dict):
    """POST /completion. Once more on a fresh connection when the pooled one was dead: llama-server announces
    keep-alive but closes the connection after a streamed answer, and the next request may find it closing."""
    import aiohttp

    try:
        return await upstream.post("/completion", json=completion)
    except aiohttp.ServerDisconnectedError:
        return await upstream.post("/completion", json=completion)


async def respond(request, upstream, body: dict, prompt, name: str):
    """Answer one /v1/chat/completions request through llama-server's /completion; an aiohttp response.

    `upstream` is the proxy's aiohttp.ClientSession to llama-server. llama-server's errors (a prompt longer
    than the context: 400) pass through as it sends them, already in the OpenAI error shape.
    """
    import aiohttp
    from aiohttp import web

    try:
        completion = completion_request(body, prompt)
    except InputError as e:
        return error(400, str(e))
    translation = Translation(name, bool((body.get("stream_options") or {}).get("include_usage")))
    async with await post_completion(upstream, completion) as answer:
        if answer.status != 200 or answer.content_type != "text/event-stream":
            data = await answer.read()
            if answer.status != 200 or completion["stream"]:  # an error, in llama-server's OpenAI shape
                log.info("/v1/chat/completions: llama-server answered %d %s", answer.status, data[:300])
                return web.Response(status=answer.status, body=data, content_type=answer.content_type)
            return web.json_response(
                translation.whole(json.loads(data)), dumps=lambda o: json.dumps(o, ensure_ascii=False)
            )
        response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        try:
            # one event a line; each leaves here as soon as llama-server sends it
            async for line in answer.content:
                if line.startswith(b"data: "):
                    for event in translation.events(json.loads(line[6:])):
                        await response.write(sse(event))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            # the client left: leaving this block closes the upstream connection, and llama-server stops
            log.info("/v1/chat/completions: client went away mid-answer")
        except aiohttp.ClientError as e:  # llama-server died mid-answer: the status is out, so an error event
            log.warning("/v1/chat/completions: llama-server went away mid-answer (%s)", e.__class__.__name__)
            with contextlib.suppress(ConnectionResetError):
                await response.write(GONE_EVENT)
        return response
