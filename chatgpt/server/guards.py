"""Who is asking: the client IP of a request, worked out once (trusted proxies only, PROTOCOL.md C.3)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from chatgpt.keys import trusted_key
from chatgpt.server.clientip import client_ip

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IDENTITY = web.RequestKey("identity", str)


def identity_of(request: web.Request) -> str:
    """The client IP: forwarded headers count only from a trusted proxy (PROTOCOL.md C.3). Worked out
    once per request (the limiter and the handler both need it)."""
    try:
        return request[IDENTITY]
    except KeyError:
        identity = request[IDENTITY] = client_ip(request.remote, request.headers, request.config_dict[trusted_key])
        return identity
