"""OpenAI's error shape for `/v1` and `/chat`: the one table from an exception to status, type and an
English message that says what failed (the caller's own key gets the upstream's own message)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from chatgpt import jsontext
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
    PromptTooLong,
    QuotaExceeded,
    RateLimited,
    ShuttingDown,
    UpstreamFailed,
)
from chatgpt.server.bodies import BadBody
from chatgpt.server.failures import answer_failures
from chatgpt.server.guards import Handler

BODY_MESSAGES = {
    "empty": (400, "The request body must be a JSON object."),
    "not_object": (400, "The request body must be a JSON object."),
    "not_json": (400, "We could not parse the JSON body of your request."),
    "too_slow": (408, "Request body not received in time."),
    "too_large": (413, "Request body too large."),
}


@dataclass(frozen=True)
class OpenAIError:
    """One error as OpenAI writes it, with its HTTP status and Retry-After."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None

    def body(self) -> dict[str, Any]:
        """`{"error": {...}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _seconds(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


def _upstream(failure: UpstreamFailed) -> OpenAIError:
    """An upstream failure: its own message when the client may see it, else what failed in English."""
    where = f" at {failure.host}" if failure.host else ""
    status = failure.status
    if failure.subject == "picture":
        return OpenAIError(502, "The upstream's picture could not be downloaded or is not an image.", "api_error")
    if failure.kind == "refused" and status is not None:
        shown = status if status in (400, 401, 403, 404, 429) else 502
        kind = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
        fallback = (f"The upstream{where} answered 404: does the base URL end in /v1?" if status == 404
                    else f"The upstream{where} refused the request (HTTP {status}).")
        return OpenAIError(shown, failure.message or fallback, kind, failure.code, retry_after=failure.retry_after)
    if failure.kind == "error":
        return OpenAIError(502, failure.message or f"The upstream{where} failed (HTTP {status}).", "api_error",
                           failure.code)
    if failure.kind == "pool_refused":
        return OpenAIError(503, "The upstream refused this server's key; try again later.", "api_error")
    if failure.kind == "unreachable":
        return OpenAIError(502, f"Could not reach the upstream{where}.", "api_error")
    if failure.kind == "timeout":  # which limit ran out, when the reader said
        return OpenAIError(504, failure.detail or f"The upstream{where} did not answer in time.", "api_error",
                           "upstream_timeout")
    if failure.kind == "empty":
        return OpenAIError(502, "The upstream sent an empty answer.", "api_error")
    return OpenAIError(502, f"The upstream{where} broke off its answer or sent something unreadable.",
                       "api_error")


def error_of(exc: BaseException) -> OpenAIError:
    """The table: every exception a `/v1` or `/chat` handler can meet, as OpenAI's error."""
    return _known(exc) or OpenAIError(500, "The server failed unexpectedly; the failure is logged.", "server_error")


def _known(exc: BaseException) -> OpenAIError | None:
    if isinstance(exc, UpstreamFailed):
        return _upstream(exc)
    if isinstance(exc, RateLimited):
        return OpenAIError(429, f"Too many requests from your address; retry in {_seconds(exc.retry_after)} s.",
                           "rate_limit_exceeded", "rate_limit_exceeded", retry_after=exc.retry_after)
    if isinstance(exc, QuotaExceeded):
        return OpenAIError(429, "Today's free questions from your address are used up; they come back at "
                           "midnight (or send your own API key as the bearer token).", "insufficient_quota",
                           "daily_quota_exceeded")
    if isinstance(exc, ModelNotFound):
        return OpenAIError(404, f"The model `{exc.model}` is not available on this server.", code="model_not_found",
                           param="model")
    if isinstance(exc, ContentRefused):
        if exc.reason == "unchecked":
            return OpenAIError(503, "The content check is unavailable; try again later.", "server_error")
        return OpenAIError(400, "The prompt contains content this server does not accept; rephrase it.",
                           code="content_filter", param="messages")
    if isinstance(exc, AnswerBlocked):
        if exc.reason == "unchecked":
            return OpenAIError(503, "The answer could not be checked; try again later.", "server_error")
        return OpenAIError(400, "The answer was stopped: it contains content this server does not pass on.",
                           code="content_filter")
    if isinstance(exc, LoginExpired):
        return OpenAIError(401, "The login token is invalid or expired; log in again.", code="invalid_token")
    if isinstance(exc, Busy):
        return OpenAIError(503, "Every upstream key of this server is busy; try again later.", "server_error",
                           retry_after=exc.retry_after)
    if isinstance(exc, Maintenance):
        return OpenAIError(503, "The service is under maintenance; try again later.", "server_error")
    if isinstance(exc, NoServerKey):
        return OpenAIError(503, "This server has no upstream API key; send your own key as the bearer token.",
                           "server_error")
    if isinstance(exc, PicturesNotOffered):
        return OpenAIError(400, "This server does not draw pictures.", code="images_not_offered")
    if isinstance(exc, PromptTooLong):
        return OpenAIError(400, f"The newest message is longer than this server accepts ({exc.budget} characters).",
                           code="context_length_exceeded", param="messages")
    if isinstance(exc, EmptyContext):
        return OpenAIError(400, "There is no message with content to answer.", param="messages")
    if isinstance(exc, BadQuestion):
        return OpenAIError(400, exc.text, code=exc.param and "invalid_value", param=exc.param)
    if isinstance(exc, BadBody):
        status, message = BODY_MESSAGES[exc.fault]
        return OpenAIError(status, message, code="request_timeout" if exc.fault == "too_slow" else None)
    if isinstance(exc, ShuttingDown):
        return OpenAIError(503, "The server is restarting; try again in a moment.", "server_error")
    return None


def error_response(exc: BaseException) -> web.Response:
    """OpenAI's error JSON with a real HTTP status (and Retry-After when there is a wait)."""
    error = error_of(exc)
    headers = {"Retry-After": _seconds(error.retry_after)} if error.retry_after is not None else None
    return web.json_response(error.body(), status=error.status, headers=headers, dumps=jsontext.dumps)


def error_event(exc: BaseException) -> bytes:
    """The headers are gone: the failure as the last SSE event, the way OpenAI reports it in a stream."""
    return b"data: " + jsontext.dumpb(error_of(exc).body()) + b"\n\n"


async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run `handler`; any failure is answered in OpenAI's shape, never as a traceback."""
    return await answer_failures(request, handler, lambda exc: None if _known(exc) is None else error_response(exc),
                                 error_response)


error_middleware = web.middleware(answer_errors)  # the `/v1` sub-application's


def openai_errors(handler: Handler) -> Handler:
    """The same for one route of the main application (`/chat`)."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await answer_errors(request, handler)
    return wrapped
