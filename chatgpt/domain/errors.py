"""Domain exceptions: refusals and failures the client should see, and upstream failures."""
from __future__ import annotations

import asyncio
from typing import Any

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.domain.keypool import retry_after_from_headers

class ServiceError(Exception):
    """A failure the client should see, with its envelope code, HTTP status and message."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int = 400,
        error_type: str = "invalid_request_error",
        error_code: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.error_type = error_type
        self.error_code = error_code
        self.retry_after = retry_after
        self.param = param
        self.detail = detail  # English, for SDK and curl users (/v1, /chat); `message` is the mini-program's




def bad_request(message: str, code: str = "300001") -> ServiceError:
    """A request that fails validation."""
    return ServiceError(code, message, http_status=400)


def shutting_down() -> ServiceError:
    """An answer cut short because the server is stopping (SIGTERM)."""
    return ServiceError("500001", texts.SHUTTING_DOWN, http_status=503, error_type="server_error")


def unexpected() -> ServiceError:
    """A bug on our side: the client gets a plain message, never a traceback."""
    return ServiceError("999999", texts.SERVICE_ERROR, http_status=500, error_type="server_error")


class UpstreamError(Exception):
    """The upstream answered with a non-2xx status (or a 2xx that is not what was asked for)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None, host: str = "",
                 description: str | None = None) -> None:
        where = f"the upstream {host}" if host else "the upstream"
        super().__init__(description or f"{where} answered HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.host = host
        self.message, self.code = _parse_openai_error(body)


class UpstreamUnreachable(Exception):
    """The upstream could not be reached (DNS, refused, reset before an answer). The message is an
    English sentence naming the host, fit for an SDK user."""


class UpstreamBroken(Exception):
    """The upstream stream ended or broke before `[DONE]`, or sent something unreadable (English message)."""


class UpstreamTimeout(UpstreamBroken):
    """No answer event within `upstream.read_timeout`, or the answer outran `upstream.answer_timeout`."""


def _parse_openai_error(body: bytes) -> tuple[str | None, str | None]:
    """Pull `error.message` and `error.code` out of an OpenAI-style error body, if it has them."""
    try:
        data = jsontext.parse(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str) and error.strip():
        return error.strip()[:500], None
    if not isinstance(error, dict):
        return None, None
    message = error.get("message")
    code = error.get("code") or error.get("type")
    return (
        message.strip()[:500] if isinstance(message, str) and message.strip() else None,
        code if isinstance(code, str) else None,
    )


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def describe_upstream(exc: BaseException, own_key: bool) -> str:
    """What failed upstream, in English for SDK and curl users. On the caller's own key the upstream's
    own message is relayed; on the server's keys a refusal of the key says only that."""
    if isinstance(exc, UpstreamError):
        if own_key and exc.message:
            return exc.message
        if exc.status == 404 and not exc.message:
            return texts.EN_UPSTREAM_404.format(host=exc.host or "upstream")
        if not own_key and (exc.status in (401, 403, 429) or exc.code == "insufficient_quota"):
            return texts.EN_POOL_KEY_REFUSED.format(status=exc.status)
        return exc.message or _sentence(str(exc))
    if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, UpstreamTimeout):
        return texts.EN_UPSTREAM_TIMEOUT
    return _sentence(str(exc)) if str(exc) else texts.EN_UPSTREAM_FAILED


def from_upstream(exc: Exception, own_key: bool = True) -> ServiceError:
    """Map an upstream failure to what the client sees: the upstream's own message when it has one."""
    detail = describe_upstream(exc, own_key)
    if isinstance(exc, UpstreamError):
        status = exc.status
        http_status = status if status in (400, 401, 403, 404, 429) else 502
        code = "400001" if status in (401, 403) else "500001"
        error_type = "rate_limit_exceeded" if status == 429 else (
            "invalid_request_error" if status < 500 else "api_error")
        retry_after = retry_after_from_headers(exc.headers) if status == 429 else None
        return ServiceError(code, exc.message or texts.UPSTREAM_FAILED, http_status=http_status,
                            error_type=error_type, error_code=exc.code, retry_after=retry_after, detail=detail)
    if isinstance(exc, UpstreamUnreachable):
        return ServiceError("500001", texts.UPSTREAM_UNREACHABLE, http_status=502, error_type="api_error",
                            detail=detail)
    if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)):
        return ServiceError("500001", texts.UPSTREAM_TIMEOUT, http_status=504, error_type="api_error",
                            error_code="upstream_timeout", detail=detail)
    if isinstance(exc, UpstreamBroken):
        return ServiceError("500001", texts.UPSTREAM_FAILED, http_status=502, error_type="api_error", detail=detail)
    raise TypeError(f"not an upstream failure: {exc!r}")
