"""How a failed network call to an upstream is told: one of our three upstream exceptions."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import aiohttp

from chatgpt.domain.errors import UpstreamBroken, UpstreamError, UpstreamTimeout, UpstreamUnreachable


def _never() -> bool:
    return False


@contextmanager
def upstream_call(what: str, answering: Callable[[], bool] = _never) -> Iterator[None]:
    """Map aiohttp and socket failures inside the block. `answering()` says whether the upstream had
    started its answer: a failure after that is a broken answer, before it an unreachable upstream."""
    try:
        yield
    except (UpstreamError, UpstreamBroken, UpstreamUnreachable):
        raise
    except aiohttp.ClientPayloadError as exc:
        raise UpstreamBroken(f"{what}: the answer broke off ({type(exc).__name__})") from None
    except TimeoutError:
        if answering():
            raise UpstreamTimeout(f"{what}: nothing received within the read timeout") from None
        raise UpstreamUnreachable(f"{what}: no answer in time") from None
    except (aiohttp.ClientError, OSError) as exc:
        kind = UpstreamBroken if answering() else UpstreamUnreachable
        raise kind(f"{what}: connection failed ({type(exc).__name__})") from None
    except ValueError as exc:  # an over-long event, or bytes that are not UTF-8
        raise UpstreamBroken(f"{what}: unreadable data ({exc})") from None
