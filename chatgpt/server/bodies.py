"""Request bodies: read whole, within a time limit, so a client that never finishes cannot hold a handler."""
from __future__ import annotations

import asyncio

from aiohttp import web

from chatgpt.domain.errors import ServiceError

BODY_SECONDS = 30.0  # a 1 MiB body over a slow phone link takes a few seconds, not thirty


async def read_raw(request: web.Request, seconds: float = BODY_SECONDS) -> bytes:
    """The body bytes (size-capped by the app's client_max_size: 413 beyond it); 408 if too slow."""
    if request.content.is_eof():
        return await request.read()  # all of it came with the headers (the usual small body): no wait
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise ServiceError("200001", "Request body not received in time.", http_status=408,
                           error_code="request_timeout") from None
