"""Fall-over between upstreams (PROTOCOL.md E.4): the next upstream serving the model gets a question
only when the one before failed before its first answer event, once each, never after."""
from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from chatgpt.domain.errors import Busy, NoServerKey, UpstreamFailed
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


MOVES_ON = frozenset({"pool_refused", "unreachable", "broken", "timeout", "error"})


def worth_another(exc: BaseException) -> bool:
    """True for a failure the next upstream may not share: unreachable, a timeout or a break before the
    first event, a 5xx, every key refused (401/403/429) or none usable. A 400 would fail anywhere."""
    return isinstance(exc, (Busy, NoServerKey)) or (isinstance(exc, UpstreamFailed) and exc.kind in MOVES_ON)


def _weight(exc: BaseException) -> int:
    """How much a failure says: no key at all < every key cooling < anything the upstream itself did."""
    return 0 if isinstance(exc, NoServerKey) else 1 if isinstance(exc, Busy) else 2


def _worse(failure: BaseException | None, exc: BaseException) -> BaseException:
    """The failure to report when every upstream failed: the latest of those that say the most."""
    if failure is None or _weight(exc) >= _weight(failure):
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


def _log_move(upstream: Upstream, candidates: Sequence[Upstream], index: int, exc: BaseException) -> None:
    what = f"HTTP {exc.status}" if isinstance(exc, UpstreamFailed) and exc.status else type(exc.__cause__ or exc).__name__
    if len(candidates) == 1:
        return  # nothing moves: the pipeline has logged the failure itself
    if index + 1 < len(candidates):
        log.warning("upstream %s failed before its first answer event (%s); asking upstream %s",
                    upstream.name, what, candidates[index + 1].name)
    else:
        log.warning("upstream %s failed before its first answer event (%s); no upstream left to ask",
                    upstream.name, what)
