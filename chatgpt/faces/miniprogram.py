"""The mini-program's HTTP routes (PROTOCOL.md A.2): every answer is an envelope on HTTP 200."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.keys import flags_key, memory_key, page_key, pipeline_key, settings_key, upstream_key
from chatgpt.server.bodies import read_raw
from chatgpt.faces.envelope import envelope_response
from chatgpt.domain.errors import ServiceError, UpstreamError, bad_request
from chatgpt.server.guards import identity_of
from chatgpt.server.images import safe_image_path
from chatgpt.domain.memory import CONVERSATION_ID
from chatgpt.faces.v1 import read_body
from chatgpt.domain.question import Payer, Question
from chatgpt.faces.markdown import to_html
from chatgpt.server.streaming import Piece, StreamingAnswer, send_stream


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or the envelope error the Java backend gave."""
    raw = await read_raw(request)
    if not raw.strip():
        raise ServiceError("200001", texts.BODY_EMPTY)
    try:
        body = jsontext.parse(raw)
    except ValueError:
        raise ServiceError("200002", texts.BODY_NOT_JSON) from None
    if not isinstance(body, dict):
        raise ServiceError("200002", texts.BODY_NOT_JSON)
    return body


async def index(request: web.Request) -> web.Response:
    """Liveness for the mini-program (a bare envelope); browsers asking for HTML get the demo page."""
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(body=request.app[page_key], content_type="text/html", charset="utf-8")
    return envelope_response()


async def status(request: web.Request) -> web.Response:
    """`state` false during maintenance; the client opens its socket only when it is true."""
    return envelope_response(state=request.app[flags_key].serving)


async def announcement(request: web.Request) -> web.Response:
    """The operator's announcement, left out when unset."""
    return envelope_response(content=request.app[flags_key].announcement or None)


def demo_messages(text: str) -> list[dict[str, Any]] | None:
    """One finished assistant bubble per `|`-separated segment of the `demoChat` flag."""
    segments = [s.strip() for s in text.split("|") if s.strip()]
    if not segments:
        return None
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    return [{"id": str(uuid.uuid4()), "role": "assistant", "parent": "1", "content": s, "html": to_html(s),
             "isSend": False, "isDone": True, "createTime": created} for s in segments]


async def demo_chat_list(request: web.Request) -> web.Response:
    """Sample conversation shown before the user asks anything."""
    return envelope_response(messageList=demo_messages(request.app[flags_key].demoChat))


async def verify_api_key(request: web.Request) -> web.Response:
    """Check a user's key with the upstream's `GET /models`; the key is never stored or logged."""
    if not request.app[flags_key].serving:
        raise ServiceError("700001", texts.MAINTENANCE)
    body = await read_json_object(request)
    key = body.get("apiKey")
    if not isinstance(key, str) or not key.strip():
        raise bad_request(texts.API_KEY_BLANK)
    try:
        await request.app[upstream_key].verify_key(key.strip())
    except UpstreamError as error:
        if error.status == 401:
            banned = "deactivated" in (error.message or "").lower()
            raise ServiceError("400001", texts.ACCOUNT_BANNED if banned else texts.API_KEY_WRONG) from None
        raise ServiceError("500001", texts.SERVICE_ERROR) from None
    except Exception as error:  # unreachable upstream, timeouts: the client only needs "failed"
        if isinstance(error, ServiceError):
            raise
        raise ServiceError("500001", texts.SERVICE_ERROR) from None
    return envelope_response()


async def login_gone(request: web.Request) -> web.Response:
    """Email/password login and access tokens no longer exist upstream (PROTOCOL.md C.1)."""
    raise ServiceError("400001", texts.LOGIN_GONE)


async def backend_api(request: web.Request) -> web.Response:
    """The old ChatGPT web proxy: say clearly that token mode is gone."""
    if not request.headers.get("Authorization", "").strip():
        raise ServiceError("900001", texts.AUTHORIZATION_NULL)
    raise ServiceError("500001", texts.TOKEN_UNSUPPORTED)


async def picture(request: web.Request) -> web.StreamResponse:
    """A saved picture; 404 for any name this server did not make, or outside the folder."""
    path = safe_image_path(request.app[settings_key].images.folder, request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400, immutable",
                                           "X-Content-Type-Options": "nosniff"})


async def debug_flag(request: web.Request) -> web.Response:
    """The raw `isDebug` flag as plain text (the client reads it as is)."""
    return web.Response(text=request.app[flags_key].isDebug, content_type="text/plain")


async def chat(request: web.Request) -> web.StreamResponse:
    """`POST /chat` for curl: the server remembers the conversation; plain text or SSE back."""
    body = await read_body(request)
    content, cid = body.get("content"), body.get("conversationId")
    if not isinstance(content, str) or not content.strip():
        raise bad_request("'content' must be a non-empty string.")
    if cid is not None and (not isinstance(cid, str) or not CONVERSATION_ID.match(cid)):
        raise bad_request("'conversationId' must be 1-100 letters, digits or _.:-")
    app = request.app
    memory, pipeline = app[memory_key], app[pipeline_key]
    cid = cid or memory.new_id()
    identity = identity_of(request)
    await pipeline.admit("chat", identity)
    payer = Payer.from_bearer(request.headers.get("Authorization"), app[settings_key].api.client_tokens)
    question = Question("chat", identity, payer, [*memory.history(cid), {"role": "user", "content": content}],
                        pipeline.choose_model(body.get("model"), strict=True))
    sse = "text/event-stream" in request.headers.get("Accept", "")
    async with aclosing(pipeline.answer(question)) as deltas:
        first = await anext(deltas, None)  # a refusal before any text keeps its real HTTP status
        response = StreamingAnswer(headers={
            "Content-Type": "text/event-stream; charset=utf-8" if sse else "text/plain; charset=utf-8",
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Conversation-Id": cid})
        await response.prepare(request)

        async def body() -> AsyncIterator[Piece]:
            parts: list[str] = []
            if sse:
                yield _event("conversation", {"conversationId": cid}), False
            delta = first
            while delta is not None:
                if delta.text:
                    parts.append(delta.text)
                    yield (_event(None, {"content": delta.text}) if sse
                           else delta.text.encode(errors="replace")), False
                elif delta.reasoning and sse and not parts:  # the model's thinking, before its answer
                    yield _event("reasoning", {"content": delta.reasoning}), False
                delta = await anext(deltas, None)
            memory.remember(cid, content, "".join(parts))  # only a finished answer is remembered
            yield (_event("done", {"conversationId": cid}) if sse else b"\n"), True

        def error_event(failure: ServiceError) -> bytes:
            message = failure.detail or failure.message
            return (_event("error", {"message": message}) if sse
                    else f"\n[error] {message}\n".encode(errors="replace"))

        return await send_stream(request, response, body(), error_event)


def _event(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + jsontext.dumpb(data) + b"\n\n"


def add_routes(app: web.Application) -> None:
    """Register the mini-program's routes; `/api1/...` and `//x` reach them through routing.py."""
    app.router.add_get("/", index)
    app.router.add_get("/status", status)
    app.router.add_get("/announcement", announcement)
    app.router.add_get("/demoChatList", demo_chat_list)
    app.router.add_post("/api/auth/apikey/verify", verify_api_key)
    app.router.add_post("/api/auth", login_gone)
    app.router.add_post("/api/auth/token/verify", login_gone)
    for path in ("/backend-api/conversations", "/backend-api/gentitle", "/backend-api/conversation",
                 "/backend-api/moderation"):
        app.router.add_route("*", path, backend_api)
    app.router.add_get("/cache/YhI86Yjjoko", debug_flag)
    app.router.add_get("/res/{name}", picture)
    app.router.add_post("/chat", chat)
