"""`/v1/*`: OpenAI-compatible routes for curl and the official SDKs, a sub-application whose errors
are OpenAI's JSON (`faces/openai_errors.py`)."""
from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain.answer import Answer, new_answer_id
from chatgpt.domain.errors import BadQuestion
from chatgpt.domain.provider import Delta
from chatgpt.domain.question import Payer, Question
from chatgpt.faces.completion import Completion
from chatgpt.faces.masking import ChunkMasker, mask_completion
from chatgpt.faces.openai_errors import error_event, error_middleware
from chatgpt.keys import pipeline_key, routes_key, settings_key
from chatgpt.server.bodies import read_object
from chatgpt.server.guards import identity_of
from chatgpt.server.streaming import Piece, StreamingAnswer, send_stream

# Fields the server decides itself; every other request field goes to the upstream as it came
# (tools, tool_choice, response_format, logprobs, seed, stop, user, stream_options, metadata...).
SERVER_OWNED = frozenset({"model", "messages", "stream", "n", "temperature"})
IMAGE_SIZE = re.compile(r"^\d{2,4}x\d{2,4}$")
EVENT_GAP = "\n\ndata: "  # between two events' data
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """`messages`: a non-empty list of objects with a string `role`; content a string, a list of parts
    or null. Every other field (tool_calls, tool_call_id, name, reasoning_content...) is kept."""
    if not isinstance(value, list) or not value:
        raise BadQuestion("'messages' must be a non-empty array.", "messages")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise BadQuestion(f"'messages.{i}' must be an object with a string 'role'.", "messages")
        content = item.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadQuestion(f"'messages.{i}.content' must be a string or an array.", "messages")
    return [dict(item) for item in value]


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadQuestion(f"'{name}' must be a positive integer.", name)
    return value


def payer_of(request: web.Request) -> Payer:
    """Who pays (PROTOCOL.md B.1), from the `Authorization` header."""
    return Payer.from_bearer(request.headers.get("Authorization"), request.config_dict[settings_key].api.client_tokens)


def parse_question(body: dict[str, Any], request: web.Request) -> tuple[Question, bool]:
    """Validate a chat completion request into the pipeline's Question and the `stream` flag."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadQuestion("'stream' must be a boolean.", "stream")
    if body.get("n") not in (None, 1):
        raise BadQuestion("Only n=1 is supported.", "n")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise BadQuestion("'temperature' must be a number between 0 and 2.", "temperature")
    # Both names stay in `extra` (the provider puts the capped limit under the name the caller used).
    limits = [n for n in (_positive(body, "max_completion_tokens"), _positive(body, "max_tokens")) if n]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadQuestion("'model' must be a string.", "model")
    extra = {k: v for k, v in body.items() if k not in SERVER_OWNED}
    question = Question("v1", identity_of(request), payer_of(request), parse_messages(body.get("messages")), model,
                        max_tokens=min(limits) if limits else None, temperature=temperature, extra=extra)
    return question, stream


def _chunk(answer_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    chunk = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + jsontext.dumpb(chunk) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`, streamed (SSE) or as one JSON answer."""
    pipeline = request.config_dict[pipeline_key]
    await pipeline.admit("v1", identity_of(request))
    body = await read_object(request)
    question, stream = parse_question(body, request)
    created = int(time.time())
    async with aclosing(pipeline.answer(question)) as deltas:
        if stream:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await _stream(request, deltas, deltas.model, created, usage)
        # Assembled from the stream: the same timeouts and fall-over as every other door (completion.py).
        answer = Completion()
        async for batch in deltas:
            for delta in batch:
                answer.add(delta)
    whole = answer.answer(deltas.model, created)
    if deltas.words is not None:
        whole = mask_completion(whole, deltas.words)  # listed words (PROTOCOL.md E.5)
    return web.Response(body=jsontext.dumpb(whole), content_type="application/json")


async def _stream(request: web.Request, deltas: Answer, model: str, created: int, usage: bool) -> web.StreamResponse:
    # The first deltas are awaited before the headers go out, so a refusal or an upstream error
    # before any text still gets its real HTTP status and OpenAI's error JSON.
    first: list[Delta] | None = await anext(deltas, None)
    response = StreamingAnswer(headers=SSE_HEADERS)
    await response.prepare(request)
    return await send_stream(request, response, _sse_body(first, deltas, model, created, usage), error_event)


async def _sse_body(first: list[Delta] | None, deltas: Answer, model: str, created: int,
                    usage: bool) -> AsyncGenerator[Piece, None]:
    """The answer as OpenAI SSE, a piece per batch of deltas: each upstream event re-framed with its data
    untouched (the usage-only chunk only for a caller that asked for it); our own chunks for a provider
    without OpenAI events. With listed words to mask, the events' text is masked and re-encoded
    (`ChunkMasker`). A batch that ends the answer (a finish reason, the usage) is held for the end."""
    answer_id = (first[0].answer_id if first else "") or new_answer_id()
    masker = ChunkMasker(deltas.words) if deltas.words is not None else None
    relayed, encoded, finish = False, False, None

    def framed(batch: list[Delta]) -> bytes:
        """One batch's SSE events: the events' data as one string, encoded once."""
        nonlocal relayed, encoded, finish
        events: list[str] = []
        chunks: list[bytes] = []  # our own, for deltas without an upstream event
        for delta in batch:
            if delta.finish_reason:
                finish = delta.finish_reason
            payload: str | None = delta.payload
            if payload:
                relayed = True
                if not usage and delta.usage_only:
                    continue
                if masker is not None:
                    payload = masker.payload(delta)
                    if payload is None:
                        continue
                # A payload of several lines needs a `data:` field per line.
                events.append(payload.replace("\n", "\ndata: ") if "\n" in payload else payload)
            elif delta.text:  # a provider without OpenAI chunks (offline, Baixing): encode our own
                text = delta.text if masker is None else masker.text(delta.text)
                if text:
                    role = {} if encoded else {"role": "assistant"}
                    encoded = True
                    chunks.append(_chunk(answer_id, created, model, {**role, "content": text}, None))
        if not events:
            return b"".join(chunks)
        data = f"data: {EVENT_GAP.join(events)}\n\n".encode()
        return data if not chunks else data + b"".join(chunks)  # a provider sends one kind or the other

    batch = first
    while batch is not None:  # also after the last batch: the pipeline finishes its accounting when the answer ends
        data = framed(batch)
        if data:
            last = batch[-1]
            yield data, bool(last.finish_reason) or last.usage_only
        batch = await anext(deltas, None)
    tail = b"data: [DONE]\n\n"
    rest = masker.rest() if masker is not None else {}
    if rest:  # held back at the end of a stream that sent no finish chunk
        rest = rest if encoded or relayed else {"role": "assistant", **rest}
        tail = _chunk(answer_id, created, model, rest, None) + tail
    yield (tail if relayed else _chunk(answer_id, created, model, {}, finish or "stop") + tail), True


async def image_generations(request: web.Request) -> web.Response:
    """`POST /v1/images/generations`: one picture, saved here and linked (or sent as `b64_json`)."""
    pipeline = request.config_dict[pipeline_key]
    await pipeline.admit("v1", identity_of(request))
    body = await read_object(request)
    prompt, size, response_format = body.get("prompt"), body.get("size"), body.get("response_format", "url")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadQuestion("'prompt' must be a non-empty string.", "prompt")
    if body.get("n", 1) != 1:
        raise BadQuestion("Only n=1 is supported.", "n")
    if response_format not in ("url", "b64_json"):
        raise BadQuestion("'response_format' must be 'url' or 'b64_json'.", "response_format")
    if size is not None and (not isinstance(size, str) or not IMAGE_SIZE.match(size)):
        raise BadQuestion("'size' must look like 1024x1024.", "size")
    question = Question("v1", identity_of(request), payer_of(request), [])
    stored = await pipeline.draw(question, prompt.strip(), size)
    item: dict[str, Any] = {"url": stored.url}
    if response_format == "b64_json":
        data = await asyncio.to_thread(pipeline.picture_bytes, stored)
        item = {"b64_json": base64.b64encode(data).decode()}
    return web.json_response({"created": int(time.time()), "data": [item]})


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: every model and alias this server offers on its own keys."""
    await request.config_dict[pipeline_key].limit("v1", identity_of(request))
    models = request.config_dict[routes_key].offered()
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "chatgpt-api"} for m in models]})


def make_app() -> web.Application:
    """The `/v1` sub-application (mounted with `app.add_subapp("/v1", ...)`): its own error middleware."""
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/models", list_models)
    app.router.add_post("/images/generations", image_generations)
    return app
