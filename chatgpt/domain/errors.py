"""Domain exceptions: why a question is refused or failed, with no wire shape.

Each face turns these into its own shape through one table (the mini-program's envelope and frames in
`faces/envelope.py`, OpenAI's error JSON in `faces/openai_errors.py`, the admin JSON in `faces/admin.py`).
Nothing here knows an envelope code, an HTTP status or an OpenAI error type."""
from __future__ import annotations

from typing import Literal

from chatgpt import jsontext


class Refused(Exception):
    """The server will not answer this question; nothing was asked upstream for it."""


class Maintenance(Refused):
    """The operator has the server in maintenance (runtime flag `status`)."""


class RateLimited(Refused):
    """The client's address is over the per-IP rate of the door it came through."""

    def __init__(self, door: str, retry_after: float) -> None:
        super().__init__(f"over the {door} rate limit")
        self.door = door
        self.retry_after = retry_after


class QuotaExceeded(Refused):
    """An anonymous user has used today's questions."""


class ModelNotFound(Refused):
    """A model that is not offered on the server's keys."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model[:100]!r} is not offered")
        self.model = model[:100]


class Busy(Refused):
    """Every key of the server's pool is cooling down (or otherwise unusable) right now."""

    def __init__(self, retry_after: float | None) -> None:
        super().__init__("every server key is busy")
        self.retry_after = retry_after


class NoServerKey(Refused):
    """The server's pool has no key at all, and the question would be paid by it."""


class PicturesNotOffered(Refused):
    """No upstream of this server draws pictures."""


class BadQuestion(Refused):
    """A question that fails validation; `text` is what the face that found it wants said."""

    def __init__(self, text: str, param: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.param = param  # the request field at fault, when there is one


class EmptyContext(BadQuestion):
    """No message with content is left to send."""


class PromptTooLong(BadQuestion):
    """The newest message alone is over the context budget."""

    def __init__(self, text: str, budget: int) -> None:
        super().__init__(text)
        self.budget = budget


ContentReason = Literal["word", "risky", "unchecked"]


class ContentRefused(Refused):
    """A prompt refused for its content (PROTOCOL.md E.5): a listed word, WeChat judged it risky, or WeChat
    could not check it and `wechat.fail_open` is off (`unchecked`). Nothing is counted for it."""

    def __init__(self, reason: ContentReason) -> None:
        super().__init__(f"prompt refused ({reason})")
        self.reason: ContentReason = reason


class AnswerBlocked(Exception):
    """An answer stopped for its content: a listed word completed (moderation.action refuse), a segment
    WeChat judged risky, or one it could not check with `wechat.fail_open` off (`unchecked`). The
    question went upstream, so it is charged."""

    def __init__(self, reason: ContentReason) -> None:
        super().__init__(f"answer blocked ({reason})")
        self.reason: ContentReason = reason


class LoginExpired(Refused):
    """A mini-program login token that is malformed, not signed by this server, or expired."""


class ShuttingDown(Exception):
    """An answer cut short because the server is stopping (SIGTERM)."""


FailureKind = Literal["refused", "error", "unreachable", "broken", "timeout", "pool_refused", "empty"]


class UpstreamFailed(Exception):
    """What the client may learn of an upstream failure, after the pipeline's rules.

    `kind`: refused (a 4xx on the caller's own key, or one that is not about the key), error (5xx),
    unreachable, broken (cut off or unreadable), timeout, pool_refused (the upstream refused one of the
    server's keys: the operator's business, so no upstream message), empty (an answer with nothing in it).
    `message` is the upstream's own message, set only when the client may see it."""

    def __init__(self, kind: FailureKind, *, status: int | None = None, message: str | None = None,
                 code: str | None = None, retry_after: float | None = None, host: str = "",
                 subject: Literal["answer", "picture"] = "answer", detail: str | None = None) -> None:
        super().__init__(f"upstream {kind}" + (f" (HTTP {status})" if status else ""))
        self.kind: FailureKind = kind
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.host = host
        self.subject = subject  # what could not be had: an answer, or the picture the upstream linked
        self.detail = detail  # for a timeout: which limit ran out, in English (host and seconds, no secret)


# --- what providers raise (PROTOCOL.md's "upstream failures"), mapped by the pipeline -------------

class UpstreamError(Exception):
    """The upstream answered with a non-2xx status (or a 2xx that is not what was asked for)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None, host: str = "",
                 description: str | None = None) -> None:
        where = f"the upstream {host}" if host else "the upstream"
        super().__init__(description or f"{where} answered HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.message, self.code = _parse_openai_error(body)


class UpstreamUnreachable(Exception):
    """The upstream could not be reached (DNS, refused, reset before an answer); the message says why."""


class UpstreamBroken(Exception):
    """The upstream stream ended before `[DONE]`, or sent something unreadable; the message says what."""


class UpstreamTimeout(UpstreamBroken):
    """No answer event within `upstream.read_timeout` (comments do not count), or the answer outran
    `upstream.answer_timeout`; the message says which."""


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
