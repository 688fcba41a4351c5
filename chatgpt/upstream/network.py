"""How a failed network call to an upstream is told: one of our upstream exceptions, in English."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from chatgpt.domain import texts
from chatgpt.domain.errors import UpstreamBroken, UpstreamError, UpstreamTimeout, UpstreamUnreachable


def _never() -> bool:
    return False


def _cause(exc: BaseException) -> str:
    """A short English cause of a connection failure (no addresses beyond the host we name anyway)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "its name does not resolve"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate was refused"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "the connection was refused or failed"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connecting timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection"
    if isinstance(exc, ConnectionResetError):
        return "it reset the connection"
    return f"the connection failed, {type(exc).__name__}"


@contextmanager
def upstream_call(host: str, answering: Callable[[], bool] = _never) -> Iterator[None]:
    """Map aiohttp and socket failures inside the block. `answering()` says whether the upstream had
    started its answer: a failure after that is a broken answer, before it an unreachable upstream."""
    try:
        yield
    except (UpstreamError, UpstreamBroken, UpstreamUnreachable):
        raise
    except aiohttp.ClientPayloadError:
        raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="the connection closed mid-answer")) from None
    except (aiohttp.ClientError, OSError) as exc:  # before TimeoutError: a connect timeout is one of these
        if answering():
            raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause=_cause(exc))) from None
        raise UpstreamUnreachable(texts.EN_UNREACHABLE.format(host=host, cause=_cause(exc))) from None
    except TimeoutError:
        raise UpstreamTimeout(texts.EN_UPSTREAM_TIMEOUT) from None
    except UnicodeDecodeError:
        raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="it sent bytes that are not UTF-8")) from None
    except HttpProcessingError:  # aiohttp's LineTooLong: a line over twice the session's read buffer
        raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="it sent a line over the length limit")) from None
    except ValueError:
        raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="it sent data that cannot be read")) from None
