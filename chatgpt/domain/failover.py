"""Fall-over between upstreams (PROTOCOL.md E.4): the next upstream serving the model gets a question
only when the one before failed before its first answer event, once each, never after."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from chatgpt.domain.errors import ServiceError, UpstreamBroken, UpstreamError, UpstreamUnreachable
from chatgpt.domain.keypool import KeyPool
from chatgpt.domain.provider import Provider

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Upstream:
    """One live upstream: what it serves, its provider (its own base URL) and its own key pool."""

    name: str
    base_url: str
    models: tuple[str, ...]
    images: bool
    usage: bool
    provider: Provider
    keys: KeyPool
    reachable: bool | None = None  # None until it answered or failed once

    def status(self) -> dict[str, object]:
        """What the operator sees of this upstream (/admin/upstreams): never a whole key."""
        return {"name": self.name, "host": host_of(self.base_url), "models": list(self.models),
                "images": self.images, "usage": self.usage, "reachable": self.reachable,
                "usable": self.keys.usable(), "keys": self.keys.health()}


def host_of(base_url: str) -> str:
    """The host (and port) of a base URL: never its path or user info, which may carry a secret."""
    parts = urlsplit(base_url)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: the host alone says enough
        port = None
    return f"{parts.hostname}:{port}" if port else str(parts.hostname)


class NoKeyLeft(Exception):
    """An upstream's pool has no usable key: none configured, disabled, or every one cooling."""


def worth_another(exc: BaseException) -> bool:
    """True for a failure the next upstream may not share: unreachable, a timeout or a break before the
    first event, a 5xx, every key refused (401/403/429) or none usable. A 400 would fail anywhere."""
    cause = exc.__cause__ if isinstance(exc, ServiceError) else exc
    if isinstance(cause, (NoKeyLeft, UpstreamUnreachable, UpstreamBroken, asyncio.TimeoutError)):
        return True
    return isinstance(cause, UpstreamError) and (cause.status >= 500 or cause.status in (401, 403, 429))


def _worse(failure: BaseException | None, exc: BaseException) -> BaseException:
    """The failure to report when every upstream failed: the latest that is more than "no key here"."""
    if failure is None or not isinstance(exc.__cause__, NoKeyLeft):
        return exc
    return failure


async def stream_first_good(candidates: Sequence[Upstream],
                            attempt: Callable[[Upstream], AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """Yield the items of `attempt(upstream)` for the first upstream that gets as far as its first item.
    Once an item has been yielded the answer belongs to that upstream: a later failure is raised as is
    (the upstream may have billed it, and the client has seen part of it)."""
    failure: BaseException | None = None
    for index, upstream in enumerate(candidates):
        started = False
        try:
            async with aclosing(attempt(upstream)) as items:
                async for item in items:
                    started = True
                    yield item
            return
        except Exception as exc:
            if started or not worth_another(exc):
                raise
            failure = _worse(failure, exc)
            _log_move(upstream, candidates, index, exc)
    if failure is None:
        raise ValueError("no upstream to ask")
    raise failure


async def call_first_good(candidates: Sequence[Upstream], attempt: Callable[[Upstream], Awaitable[T]]) -> T:
    """The result of `attempt(upstream)` for the first upstream that does not fail in a way
    `worth_another` accepts (a picture: nothing is seen before the whole answer)."""
    failure: BaseException | None = None
    for index, upstream in enumerate(candidates):
        try:
            return await attempt(upstream)
        except Exception as exc:
            if not worth_another(exc):
                raise
            failure = _worse(failure, exc)
            _log_move(upstream, candidates, index, exc)
    if failure is None:
        raise ValueError("no upstream to ask")
    raise failure


def _log_move(upstream: Upstream, candidates: Sequence[Upstream], index: int, exc: BaseException) -> None:
    cause = exc.__cause__ if isinstance(exc, ServiceError) else exc
    what = f"HTTP {cause.status}" if isinstance(cause, UpstreamError) else type(cause).__name__
    if len(candidates) == 1:
        return  # nothing moves: the pipeline has logged the failure itself
    if index + 1 < len(candidates):
        log.warning("upstream %s failed before its first answer event (%s); asking upstream %s",
                    upstream.name, what, candidates[index + 1].name)
    else:
        log.warning("upstream %s failed before its first answer event (%s); no upstream left to ask",
                    upstream.name, what)
