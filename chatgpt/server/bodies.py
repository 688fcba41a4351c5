"""Request bodies: read whole, within a time limit, so a client that never finishes cannot hold a handler;
and parsed as the one JSON object every route expects."""
from __future__ import annotations

import asyncio
from typing import Any, Literal

from aiohttp import web

from chatgpt import jsontext

BODY_SECONDS = 30.0  # a 1 MiB body over a slow phone link takes a few seconds, not thirty
Fault = Literal["empty", "not_json", "not_object", "too_slow", "too_large"]


class BadBody(Exception):
    """A body that is not one JSON object, too large, or not received in time; each face says it its way."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(f"request body: {fault}")
        self.fault: Fault = fault


async def read_raw(request: web.Request, seconds: float = BODY_SECONDS) -> bytes:
    """The body bytes (size-capped by the app's client_max_size); BadBody when too large or too slow."""
    try:
        if request.content.is_eof():
            return await request.read()  # all of it came with the headers (the usual small body): no wait
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise BadBody("too_slow") from None
    except web.HTTPRequestEntityTooLarge:
        raise BadBody("too_large") from None


async def read_object(request: web.Request, *, blank: Any = None) -> dict[str, Any]:
    """The body as a JSON object; `blank` (when given) stands for an empty body."""
    raw = await read_raw(request)
    if not raw.strip():
        if blank is not None:
            return dict(blank)
        raise BadBody("empty")
    try:
        body = jsontext.parse(raw)
    except ValueError:
        raise BadBody("not_json") from None
    if not isinstance(body, dict):
        raise BadBody("not_object")
    return body
