"""The one rule for answering a failure in any surface's shape: aiohttp's own answers and a client that
left pass through, any other failure is answered, and one the surface does not know is logged."""
from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from chatgpt.server.guards import Handler

log = logging.getLogger(__name__)

Answer = Callable[[Exception], web.StreamResponse]


async def answer_failures(request: web.Request, handler: Handler,
                          known: Callable[[Exception], web.StreamResponse | None],
                          unexpected: Answer) -> web.StreamResponse:
    """Run `handler`; a failure gets `known(exc)`, else `unexpected(exc)` and a traceback in the log."""
    try:
        return await handler(request)
    except (web.HTTPException, ConnectionResetError):
        raise  # aiohttp's own answers; a client that left gets nothing
    except Exception as exc:  # CancelledError (the client left) is a BaseException: it passes
        answer = known(exc)
        if answer is None:
            log.exception("unexpected error on %s %s", request.method, request.path)
            answer = unexpected(exc)
        return answer
