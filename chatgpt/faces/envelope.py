"""The mini-program's shapes: the flat JSON envelope, and the one table from an exception to its envelope
code and Chinese text (the websocket's error frames show the same texts)."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.domain.errors import (
    AnswerBlocked,
    BadQuestion,
    Busy,
    ContentRefused,
    EmptyContext,
    LoginExpired,
    Maintenance,
    ModelNotFound,
    NoServerKey,
    PicturesNotOffered,
    QuotaExceeded,
    RateLimited,
    ShuttingDown,
    UpstreamFailed,
)
from chatgpt.server.bodies import BadBody
from chatgpt.server.failures import answer_failures
from chatgpt.server.guards import Handler

OK = "000000"
UNEXPECTED = ("999999", texts.SERVICE_ERROR)
BODY_FAULTS = {
    "empty": ("200001", texts.BODY_EMPTY),
    "not_json": ("200002", texts.BODY_NOT_JSON),
    "not_object": ("200002", texts.BODY_NOT_JSON),
    "too_slow": ("200001", "Request body not received in time."),
    "too_large": ("200002", "Request body too large."),
}


def envelope(status: str = OK, msg: str = texts.SUCCESS, **fields: Any) -> dict[str, Any]:
    """Build one envelope; fields that are None are left out, as the client expects."""
    body: dict[str, Any] = {"status": status, "msg": msg, "timestamp": int(time.time() * 1000)}
    body.update((k, v) for k, v in fields.items() if v is not None)
    return body


def envelope_response(status: str = OK, msg: str = texts.SUCCESS, **fields: Any) -> web.Response:
    """An envelope as an HTTP 200 JSON answer: the client ignores HTTP status codes."""
    text = jsontext.dumps(envelope(status, msg, **fields))
    return web.Response(text=text, content_type="application/json")


def _upstream(failure: UpstreamFailed) -> tuple[str, str]:
    """The upstream's own message when it has one (PROTOCOL.md A.3), else the generic texts."""
    code = "400001" if failure.kind == "refused" and failure.status in (401, 403) else "500001"
    if failure.message:
        return code, failure.message
    if failure.kind == "timeout":  # PROTOCOL.md E.2: read_timeout or answer_timeout ran out
        return code, texts.UPSTREAM_TIMEOUT
    return code, texts.UPSTREAM_UNREACHABLE if failure.kind == "unreachable" else texts.UPSTREAM_FAILED


def known_error(exc: BaseException) -> tuple[str, str] | None:
    """The table: (envelope status, text) for every exception the mini-program's surfaces can meet."""
    if isinstance(exc, UpstreamFailed):
        return _upstream(exc)
    if isinstance(exc, RateLimited):
        return "700001", texts.WS_TOO_FAST if exc.door == "ws" else texts.HTTP_TOO_FAST
    if isinstance(exc, Maintenance):
        return "700001", texts.MAINTENANCE
    if isinstance(exc, QuotaExceeded):
        return "700001", texts.QUOTA_USED_UP
    if isinstance(exc, ModelNotFound):
        return "300001", texts.MODEL_NOT_FOUND.format(model=exc.model)
    if isinstance(exc, ContentRefused):
        return "400001", texts.CONTENT_UNCHECKED if exc.reason == "unchecked" else texts.CONTENT_SENSITIVE
    if isinstance(exc, AnswerBlocked):
        return "400001", texts.CONTENT_UNCHECKED if exc.reason == "unchecked" else texts.CONTENT_BLOCKED
    if isinstance(exc, LoginExpired):
        return "400001", texts.LOGIN_EXPIRED
    if isinstance(exc, Busy):
        return "500001", texts.SERVER_BUSY
    if isinstance(exc, NoServerKey):
        return "500001", texts.NO_SERVER_KEY
    if isinstance(exc, PicturesNotOffered):
        return "500001", texts.NO_IMAGES
    if isinstance(exc, EmptyContext):
        return "300003", exc.text
    if isinstance(exc, BadQuestion):
        return "300001", exc.text
    if isinstance(exc, BadBody):
        return BODY_FAULTS[exc.fault]
    if isinstance(exc, ShuttingDown):
        return "500001", texts.SHUTTING_DOWN
    return None


def error_text(exc: BaseException) -> str:
    """What a websocket error frame says of `exc`."""
    return (known_error(exc) or UNEXPECTED)[1]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The main application's: a failure on a mini-program route is an envelope on HTTP 200, never a
    traceback. (`/v1`, `/admin` and `/chat` answer their own failures in their own shapes first.)"""
    return await answer_failures(request, handler, _known_response, lambda exc: envelope_response(*UNEXPECTED))


def _known_response(exc: Exception) -> web.Response | None:
    known = known_error(exc)
    return None if known is None else envelope_response(*known)
