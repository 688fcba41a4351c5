"""The mini-program's HTTP routes (PROTOCOL.md A.2): every answer is an envelope on HTTP 200."""
from __future__ import annotations

import functools
import time
import uuid
from typing import Any

from aiohttp import web

from chatgpt.domain import texts
from chatgpt.domain.errors import BadQuestion, Maintenance, UpstreamError
from chatgpt.faces.envelope import envelope_response
from chatgpt.faces.markdown import to_html
from chatgpt.keys import flags_key, page_key, pipeline_key, settings_key, upstream_key
from chatgpt.server.bodies import read_object
from chatgpt.server.guards import Handler, identity_of
from chatgpt.server.images import safe_image_path


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
        raise Maintenance("the server is in maintenance")
    body = await read_object(request)
    key = body.get("apiKey")
    if not isinstance(key, str) or not key.strip():
        raise BadQuestion(texts.API_KEY_BLANK, "apiKey")
    try:
        await request.app[upstream_key].verify_key(key.strip())
    except UpstreamError as error:
        if error.status == 401:
            banned = "deactivated" in (error.message or "").lower()
            return envelope_response("400001", texts.ACCOUNT_BANNED if banned else texts.API_KEY_WRONG)
        return envelope_response("500001", texts.SERVICE_ERROR)
    except Exception:  # unreachable upstream, timeouts: the client only needs "failed"
        return envelope_response("500001", texts.SERVICE_ERROR)
    return envelope_response()


async def login_gone(request: web.Request) -> web.Response:
    """Email/password login and access tokens no longer exist upstream (PROTOCOL.md C.1)."""
    return envelope_response("400001", texts.LOGIN_GONE)


async def backend_api(request: web.Request) -> web.Response:
    """The old ChatGPT web proxy: say clearly that token mode is gone."""
    if not request.headers.get("Authorization", "").strip():
        return envelope_response("900001", texts.AUTHORIZATION_NULL)
    return envelope_response("500001", texts.TOKEN_UNSUPPORTED)


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


def limited(handler: Handler) -> Handler:
    """A mini-program route under the per-IP limit of the `http` door (PROTOCOL.md A.2)."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        await request.app[pipeline_key].limit("http", identity_of(request))
        return await handler(request)
    return wrapped


def add_routes(app: web.Application) -> None:
    """Register the mini-program's routes; `/api1/...` and `//x` reach them through routing.py.
    Pictures are not limited: a page shows several at once."""
    app.router.add_get("/", limited(index))
    app.router.add_get("/status", limited(status))
    app.router.add_get("/announcement", limited(announcement))
    app.router.add_get("/demoChatList", limited(demo_chat_list))
    app.router.add_post("/api/auth/apikey/verify", limited(verify_api_key))
    app.router.add_post("/api/auth", limited(login_gone))
    app.router.add_post("/api/auth/token/verify", limited(login_gone))
    for path in ("/backend-api/conversations", "/backend-api/gentitle", "/backend-api/conversation",
                 "/backend-api/moderation"):
        app.router.add_route("*", path, limited(backend_api))
    app.router.add_get("/cache/YhI86Yjjoko", limited(debug_flag))
    app.router.add_get("/res/{name}", picture)
