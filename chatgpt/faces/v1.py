"""`/v1/*`: OpenAI-compatible routes for curl and the official SDKs, errors in OpenAI's shape."""
from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.keys import pipeline_key, routes_key, settings_key
from chatgpt.server.bodies import read_raw
from chatgpt.domain.errors import ServiceError, bad_request
from chatgpt.server.guards import identity_of
from chatgpt.domain.provider import Delta
from chatgpt.domain.question import Payer, Question
from chatgpt.faces.completion import Completion, mint_id
from chatgpt.server.streaming import Piece, StreamingAnswer, send_stream

# Fields the server decides itself; every other request field goes to the upstream as it came
# (tools, tool_choice, response_format, logprobs, seed, stop, user, stream_options, metadata...).
SERVER_OWNED = frozenset({"model", "messages", "stream", "n", "temperature"})
IMAGE_SIZE = re.compile(r"^\d{2,4}x\d{2,4}$")
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _invalid(message: str, param: str | None = None) -> ServiceError:
    error = bad_request(message)
    error.param = param
    error.error_code = param and "invalid_value"
    return error


async def read_body(request: web.Request) -> dict[str, Any]:
    """The JSON object body of an OpenAI request, or a 400 in OpenAI's error shape."""
    raw = await read_raw(request)
    try:
        body = jsontext.parse(raw) if raw.strip() else None
    except ValueError:
        raise _invalid("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    return body


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """`messages`: a non-empty list of objects with a string `role`; content a string, a list of parts
    or null. Every other field (tool_calls, tool_call_id, name, reasoning_content...) is kept."""
    if not isinstance(value, list) or not value:
        raise _invalid("'messages' must be a non-empty array.", "messages")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _invalid(f"'messages.{i}' must be an object with a string 'role'.", "messages")
        content = item.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _invalid(f"'messages.{i}.content' must be a string or an array.", "messages")
    return [dict(item) for item in value]


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _invalid(f"'{name}' must be a positive integer.", name)
    return value


def parse_question(body: dict[str, Any], request: web.Request) -> tuple[Question, bool]:
    """Validate a chat completion request into the pipeline's Question and the `stream` flag."""
    app = request.app
    payer = Payer.from_bearer(request.headers.get("Authorization"), app[settings_key].api.client_tokens)
    identity = identity_of(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    if body.get("n") not in (None, 1):
        raise _invalid("Only n=1 is supported.", "n")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise _invalid("'temperature' must be a number between 0 and 2.", "temperature")
    limits = [n for n in (_positive(body, "max_completion_tokens"), _positive(body, "max_tokens")) if n]
    extra = {k: v for k, v in body.items() if k not in SERVER_OWNED}
    model = body.get("model")
    if payer.kind == "own" and isinstance(model, str) and model.strip():
        chosen = model  # the caller pays: any model its key allows
    else:
        chosen = app[pipeline_key].choose_model(model, strict=True)
    question = Question("v1", identity, payer, parse_messages(body.get("messages")), chosen,
                        max_tokens=min(limits) if limits else None, temperature=temperature, extra=extra,
                        trim=payer.kind != "own")
    return question, stream


def _chunk(answer_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    chunk = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + jsontext.dumpb(chunk) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`, streamed (SSE) or as one JSON answer."""
    body = await read_body(request)
    question, stream = parse_question(body, request)
    pipeline = request.app[pipeline_key]
    await pipeline.admit("v1", question.identity)
    created = int(time.time())
    async with aclosing(pipeline.answer(question)) as deltas:
        if stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await _stream(request, deltas, question.model, created, usage)
        # Assembled from the stream: the same timeouts and fall-over as every other door (completion.py).
        answer = Completion()
        async for delta in deltas:
            answer.add(delta)
    return web.Response(body=jsontext.dumpb(answer.answer(question.model, created)), content_type="application/json")


async def _stream(request: web.Request, deltas: AsyncIterator[Delta], model: str, created: int,
                  usage: bool) -> web.StreamResponse:
    # The first delta is awaited before the headers go out, so a refusal or an upstream error
    # before any event still gets its real HTTP status and OpenAI's error JSON.
    first: Delta | None = await anext(deltas, None)
    response = StreamingAnswer(headers=SSE_HEADERS)
    await response.prepare(request)
    return await send_stream(request, response, _sse_body(first, deltas, model, created, usage), _error_event)


def _event(payload: str) -> bytes:
    """One SSE event carrying `payload` untouched; a payload of several lines needs a `data:` field per line."""
    if "\n" in payload:
        payload = payload.replace("\n", "\ndata: ")
    return f"data: {payload}\n\n".encode()


async def _sse_body(first: Delta | None, deltas: AsyncIterator[Delta], model: str, created: int,
                    usage: bool) -> AsyncIterator[Piece]:
    """The answer as OpenAI SSE: each upstream event re-framed with its data untouched (the usage-only
    chunk only for a caller that asked for it); our own chunks for a provider without OpenAI events."""
    answer_id = (first.answer_id if first else "") or mint_id()
    relayed, encoded, finish = False, False, None

    def piece(delta: Delta) -> bytes | None:
        nonlocal relayed, encoded, finish
        finish = delta.finish_reason or finish
        if delta.payload:
            relayed = True
            return _event(delta.payload) if usage or not delta.usage_only else None
        if delta.text:  # a provider without OpenAI chunks (offline, Baixing): encode our own
            role = {} if encoded else {"role": "assistant"}
            encoded = True
            return _chunk(answer_id, created, model, {**role, "content": delta.text}, None)
        return None

    if first is not None:
        if (data := piece(first)) is not None:
            yield data, False
        # Also after the last piece: the pipeline finishes its accounting when the answer ends.
        async for delta in deltas:
            if (data := piece(delta)) is not None:
                yield data, False
    tail = b"data: [DONE]\n\n"
    yield (tail if relayed else _chunk(answer_id, created, model, {}, finish or "stop") + tail), True


def _error_event(failure: ServiceError) -> bytes:
    """Headers are gone: report the failure the way OpenAI does inside a stream."""
    payload = {"error": {"message": failure.detail or failure.message, "type": failure.error_type, "param": None,
                         "code": failure.error_code}}
    return b"data: " + jsontext.dumpb(payload) + b"\n\n"


async def image_generations(request: web.Request) -> web.Response:
    """`POST /v1/images/generations`: one picture, saved here and linked (or sent as `b64_json`)."""
    body = await read_body(request)
    app = request.app
    prompt, size, response_format = body.get("prompt"), body.get("size"), body.get("response_format", "url")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("'prompt' must be a non-empty string.", "prompt")
    if body.get("n") not in (None, 1):
        raise _invalid("Only n=1 is supported.", "n")
    if response_format not in ("url", "b64_json"):
        raise _invalid("'response_format' must be 'url' or 'b64_json'.", "response_format")
    if size is not None and (not isinstance(size, str) or not IMAGE_SIZE.match(size)):
        raise _invalid("'size' must look like 1024x1024.", "size")
    payer = Payer.from_bearer(request.headers.get("Authorization"), app[settings_key].api.client_tokens)
    identity = identity_of(request)
    pipeline = app[pipeline_key]
    await pipeline.admit("v1", identity)
    question = Question("v1", identity, payer, [], app[settings_key].upstream.model)
    # The operator pays on the pool: the configured size. A caller on its own key picks its own.
    stored = await pipeline.image(question, prompt.strip(), size if payer.kind == "own" else None)
    item: dict[str, Any] = {"url": stored.url}
    if response_format == "b64_json":
        data = await asyncio.to_thread(pipeline.images.read, stored)
        item = {"b64_json": base64.b64encode(data).decode()}
    return web.json_response({"created": int(time.time()), "data": [item]})


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: every model and alias this server offers on its own keys."""
    models = request.app[routes_key].offered()
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "chatgpt-api"} for m in models]})


def add_routes(app: web.Application) -> None:
    """Register `/v1/*`."""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/images/generations", image_generations)
