"""The error middleware: every failure ends as the contract's error shape, never a traceback."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain.errors import ServiceError, unexpected
from chatgpt.faces.envelope import envelope_response

log = logging.getLogger(__name__)


def openai_error_response(error: ServiceError) -> web.Response:
    """OpenAI's error JSON with a real HTTP status (and Retry-After on 429)."""
    body: dict[str, Any] = {"error": {"message": error.detail or error.message, "type": error.error_type,
                                      "param": error.param, "code": error.error_code}}
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return web.json_response(body, status=error.http_status, headers=headers,
                             dumps=jsontext.dumps)


def _uses_http_errors(request: web.Request) -> bool:
    """Routes for curl and SDKs answer errors as OpenAI JSON with real statuses; the rest as envelopes."""
    path = request.path.lstrip("/")
    return path.startswith(("v1/", "admin/")) or path == "chat"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure ends as the contract's error shape; nothing reaches the client as a traceback."""
    try:
        return await handler(request)
    except ServiceError as error:
        failure = error
    except web.HTTPRequestEntityTooLarge:
        failure = ServiceError("200002", "Request body too large.", http_status=413)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        failure = unexpected()
    if _uses_http_errors(request):
        return openai_error_response(failure)
    return envelope_response(failure.code, failure.message)
