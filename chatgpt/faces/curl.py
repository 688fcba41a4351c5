"""`POST /chat` for curl: the server remembers the conversation; plain text or SSE back; errors in
OpenAI's JSON shape (`faces/openai_errors.py`)."""
from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain.answer import Answer
from chatgpt.domain.errors import BadQuestion
from chatgpt.domain.memory import CONVERSATION_ID, ConversationMemory, owner_of
from chatgpt.domain.provider import Delta
from chatgpt.domain.question import Question
from chatgpt.faces.openai_errors import error_of, openai_errors
from chatgpt.faces.v1 import payer_of
from chatgpt.keys import memory_key, pipeline_key
from chatgpt.server.bodies import read_object
from chatgpt.server.guards import identity_of
from chatgpt.server.streaming import Piece, StreamingAnswer, send_stream


def _event(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + jsontext.dumpb(data) + b"\n\n"


@openai_errors
async def chat(request: web.Request) -> web.StreamResponse:
    """`POST /chat {"content": ..., "conversationId": ...}`: one turn of a remembered conversation."""
    pipeline = request.config_dict[pipeline_key]
    identity = identity_of(request)
    await pipeline.admit("chat", identity)
    body = await read_object(request)
    content, cid = body.get("content"), body.get("conversationId")
    if not isinstance(content, str) or not content.strip():
        raise BadQuestion("'content' must be a non-empty string.")
    if cid is not None and (not isinstance(cid, str) or not CONVERSATION_ID.match(cid)):
        raise BadQuestion("'conversationId' must be 1-100 letters, digits or _.:-")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadQuestion("'model' must be a string.", "model")
    memory = request.config_dict[memory_key]
    payer = payer_of(request)
    # Ids are issued by the server and bound to their caller: an id this caller does not hold
    # (unknown, expired, someone else's) starts a new conversation under a new id (PROTOCOL.md E.3).
    owner = owner_of(identity, payer)
    cid, history = await memory.open(cid, owner)
    question = Question("chat", identity, payer, [*history, {"role": "user", "content": content}], model)
    sse = "text/event-stream" in request.headers.get("Accept", "")
    async with aclosing(pipeline.answer(question)) as deltas:
        first = await anext(deltas, None)  # a refusal before any text keeps its real HTTP status
        response = StreamingAnswer(headers={
            "Content-Type": "text/event-stream; charset=utf-8" if sse else "text/plain; charset=utf-8",
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Conversation-Id": cid})
        await response.prepare(request)
        body_pieces = _body(first, deltas, memory, cid, owner, content, sse)
        return await send_stream(request, response, body_pieces, _error_event(sse))


async def _body(first: list[Delta] | None, deltas: Answer, memory: ConversationMemory, cid: str, owner: str,
                content: str, sse: bool) -> AsyncGenerator[Piece, None]:
    """The answer as plain text, or as SSE events (`conversation`, then data, then `done`); a piece per
    batch of deltas."""
    parts: list[str] = []
    # With listed words, each holds back only a tail that could still become a word (PROTOCOL.md E.5).
    masker = deltas.words.stream() if deltas.words is not None else None
    thinking = deltas.words.stream() if deltas.words is not None else None
    answering = False
    out: list[bytes] = [_event("conversation", {"conversationId": cid})] if sse else []
    batch = first
    while batch is not None:
        for delta in batch:
            if delta.text:
                if sse and not answering and thinking is not None and (held := thinking.flush()):
                    out.append(_event("reasoning", {"content": held}))  # the reasoning is over
                answering = True
                text = delta.text if masker is None else masker.feed(delta.text)
                if text:
                    parts.append(text)
                    out.append(_piece(text, sse))
            elif delta.reasoning and sse and not answering:  # the model's thinking, before its answer
                reasoning = delta.reasoning if thinking is None else thinking.feed(delta.reasoning)
                if reasoning:
                    out.append(_event("reasoning", {"content": reasoning}))
        if out:
            yield b"".join(out), False
            out.clear()
        batch = await anext(deltas, None)
    end = b"".join(out) + (_event("done", {"conversationId": cid}) if sse else b"\n")
    if masker is not None and (rest := masker.flush()):
        parts.append(rest)
        end = _piece(rest, sse) + end
    await memory.remember(cid, owner, content, "".join(parts))  # only a finished answer is remembered, as sent
    yield end, True


def _piece(text: str, sse: bool) -> bytes:
    return _event(None, {"content": text}) if sse else text.encode(errors="replace")


def _error_event(sse: bool) -> Callable[[BaseException], bytes]:
    def error_event(failure: BaseException) -> bytes:
        message = error_of(failure).message
        return _event("error", {"message": message}) if sse else f"\n[error] {message}\n".encode(errors="replace")
    return error_event


def add_routes(app: web.Application) -> None:
    """Register `/chat` (on the main application: `//chat` reaches it too)."""
    app.router.add_post("/chat", chat)
