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
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.error_type = error_type
        self.error_code = error_code
        self.retry_after = retry_after
        self.param = param


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

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.message, self.code = _parse_openai_error(body)


class UpstreamUnreachable(Exception):
    """The upstream could not be reached (DNS, refused, reset before an answer)."""


class UpstreamBroken(Exception):
    """The upstream stream ended or stalled before `[DONE]`, or sent something unreadable."""


class UpstreamTimeout(UpstreamBroken):
    """The upstream sent nothing for `upstream.read_timeout` seconds in the middle of an answer."""


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


def from_upstream(exc: Exception) -> ServiceError:
    """Map an upstream failure to what the client sees: the upstream's own message when it has one."""
    if isinstance(exc, UpstreamError):
        status = exc.status
        http_status = status if status in (400, 401, 403, 404, 429) else 502
        code = "400001" if status in (401, 403) else "500001"
        error_type = "rate_limit_exceeded" if status == 429 else (
            "invalid_request_error" if status < 500 else "api_error")
        retry_after = retry_after_from_headers(exc.headers) if status == 429 else None
        return ServiceError(code, exc.message or texts.UPSTREAM_FAILED, http_status=http_status,
                            error_type=error_type, error_code=exc.code, retry_after=retry_after)
    if isinstance(exc, UpstreamUnreachable):
        return ServiceError("500001", texts.UPSTREAM_UNREACHABLE, http_status=502, error_type="api_error")
    if isinstance(exc, (UpstreamBroken, asyncio.TimeoutError)):
        http_status = 504 if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)) else 502
        return ServiceError("500001", texts.UPSTREAM_FAILED, http_status=http_status, error_type="api_error")
    raise TypeError(f"not an upstream failure: {exc!r}")
