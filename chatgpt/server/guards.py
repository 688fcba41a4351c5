"""Per-IP rate limits on the HTTP routes: envelope `700001` for the mini-program, 429 on `/v1`."""
from __future__ import annotations

import re

from aiohttp import web

from chatgpt.domain import texts
from chatgpt.keys import http_limits_key, metrics_key, trusted_key
from chatgpt.server.clientip import client_ip
from chatgpt.domain.errors import ServiceError
from chatgpt.server.errors import Handler

_SLASHES = re.compile(r"/{2,}")
# Not limited here: the websocket limits questions itself (heartbeats never count), the admin API
# is behind a token, and operations endpoints are scraped by monitoring.
_EXEMPT = ("/websocket", "/admin/", "/healthz", "/metrics", "/res/")


IDENTITY = web.RequestKey("identity", str)


def identity_of(request: web.Request) -> str:
    """The client IP: forwarded headers count only from a trusted proxy (PROTOCOL.md C.3).
    Worked out once per request, by the middleware below (the limiter and the handler need it)."""
    try:
        return request[IDENTITY]
    except KeyError:  # a request that did not pass the middleware
        identity = request[IDENTITY] = client_ip(request.remote, request.headers, request.app[trusted_key])
        return identity


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a client over its per-IP rate before any work is done for it."""
    identity = request[IDENTITY] = client_ip(request.remote, request.headers, request.app[trusted_key])
    path = _SLASHES.sub("/", request.path)
    if path.startswith(_EXEMPT):
        return await handler(request)
    limits = request.app[http_limits_key]
    table = limits["v1"] if path.startswith("/v1/") else limits["http"]
    if not await table.allow(identity):
        request.app[metrics_key].limiter_refusals.labels("v1" if path.startswith("/v1/") else "http").inc()
        raise ServiceError("700001", texts.HTTP_TOO_FAST, http_status=429, error_type="rate_limit_exceeded",
                           error_code="rate_limit_exceeded", retry_after=table.retry_after(identity))
    return await handler(request)
