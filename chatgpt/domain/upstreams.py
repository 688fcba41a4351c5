"""Which provider and key answer a question, the one key-retry orchestration for chat and pictures,
and what an upstream failure becomes (key health, metrics, what the client may learn)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import (
    Busy,
    NoServerKey,
    UpstreamBroken,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgpt.domain.keypool import KeyPool, mask, retry_after_from_headers
from chatgpt.domain.provider import Provider
from chatgpt.domain.question import Payer

log = logging.getLogger(__name__)

T = TypeVar("T")
UPSTREAM_FAILURES = (UpstreamError, UpstreamUnreachable, UpstreamBroken, asyncio.TimeoutError)
KEY_REFUSALS = (401, 403, 429)  # statuses that are about the key, not the question: retried on the next key
# One call to a provider with a key: what it yields (answer deltas, or the one picture drawn).
Attempt = Callable[[Provider, "str | None"], AsyncIterator[T]]


@asynccontextmanager
async def opened(stream: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """`contextlib.aclosing` for any async iterator: an async generator is closed on the way out, so
    an upstream request is cancelled as soon as nobody reads its answer."""
    try:
        yield stream
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


@dataclass
class Progress:
    """How far one question got: the refund rule depends on it (PROTOCOL.md E.1)."""

    asked: bool = False  # a request went upstream
    produced: bool = False  # the upstream gave something of an answer (text, reasoning, a tool call, a picture)


@dataclass(frozen=True)
class Route:
    """Who answers a question: a provider, with the caller's own key or with keys from the pool."""

    provider: Provider
    key: str | None = None  # the caller's own key (never stored or logged)
    pooled: bool = False  # keys come from the server's pool, one retry on a key refusal
    debug: bool = False  # the Baixing relay (runtime flag isDebug): its own day limit

    @property
    def free(self) -> bool:
        """The built-in offline provider's answers cost nobody anything (PROTOCOL.md E.1)."""
        return self.provider.name == "offline"


def failure_of(exc: BaseException, pooled: bool, host: str,
               subject: Literal["answer", "picture"] = "answer") -> UpstreamFailed:
    """What the client may learn of an upstream failure. A refusal of one of the server's keys is the
    operator's business (its message names the key or the organisation): no upstream message then."""
    if isinstance(exc, UpstreamError):
        if pooled and (exc.status in KEY_REFUSALS or exc.code == "insufficient_quota"):
            return UpstreamFailed("pool_refused", status=exc.status, code=exc.code, host=host)
        if exc.status < 400:  # a 2xx that is not the stream that was asked for
            return UpstreamFailed("broken", status=exc.status, host=host, subject=subject)
        retry_after = retry_after_from_headers(exc.headers) if exc.status == 429 else None
        return UpstreamFailed("error" if exc.status >= 500 else "refused", status=exc.status,
                              message=exc.message, code=exc.code, retry_after=retry_after, host=host)
    if isinstance(exc, UpstreamUnreachable):
        return UpstreamFailed("unreachable", host=host, subject=subject)
    if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)):
        return UpstreamFailed("timeout", host=host, subject=subject)
    return UpstreamFailed("broken", host=host, subject=subject)


class Upstreams:
    """The providers (the pool's, the caller's own key's, the Baixing relay), the server's key pool,
    and whether the upstream was reachable the last time it was asked."""

    def __init__(self, pool_provider: Provider, own_key_provider: Provider, debug_provider: Provider,
                 keys: KeyPool, meter: Meter, hosts: dict[str, str] | None = None) -> None:
        self._pool_provider = pool_provider
        self._own_key_provider = own_key_provider
        self._debug_provider = debug_provider
        self._keys = keys
        self._meter = meter
        self._hosts = hosts or {}  # provider name -> the host it calls, for "could not reach <host>"
        self.upstream_ok: bool | None = None  # None until the upstream has answered or failed once

    def route(self, payer: Payer, *, debug: bool = False) -> Route:
        """The caller's own key → the OpenAI-compatible upstream; isDebug → the Baixing relay; else the
        pool's provider (offline when there is no key), with pool keys unless it is offline."""
        if payer.kind == "own":
            return Route(self._own_key_provider, payer.key)
        if debug:
            return Route(self._debug_provider, debug=True)
        return Route(self._pool_provider, pooled=self._pool_provider.name != "offline")

    def health(self) -> dict[str, Any]:
        """Key counts and upstream reachability, for `/healthz`."""
        return {"keys": {"configured": len(self._keys), "healthy": self._keys.usable()},
                "upstream_reachable": self.upstream_ok}

    def stores(self) -> dict[str, Any]:
        """The key pool's health as the state file keeps it."""
        return {"keys": self._keys}

    async def call(self, route: Route, attempt: Attempt[T], progress: Progress) -> AsyncIterator[T]:
        """Run `attempt` with the route's key, or with pool keys: a key refusal (401/403/429) before
        anything was yielded is retried once on the next key; nothing else is ever re-sent (it may
        already be billed). Failures become UpstreamFailed, Busy or NoServerKey."""
        tried: list[str] = []
        refused: UpstreamFailed | None = None
        while True:
            pool_key = self._next_key(tried, refused) if route.pooled else None
            if pool_key is not None:
                self._keys.record_request(pool_key)
            progress.asked = True
            yielded = False
            try:
                async with opened(attempt(route.provider, pool_key or route.key)) as items:
                    async for item in items:
                        yielded = True
                        yield item
            except UPSTREAM_FAILURES as exc:
                failure = self.failed(route.provider.name, exc, pool_key)
                if yielded or not self._retryable(failure, tried):
                    raise self._busy_or(failure) from exc
                refused = failure
                log.info("key %s refused (HTTP %s); retrying once on the next key", mask(tried[-1]), failure.status)
                continue
            if route.provider.name != "offline":  # the built-in provider says nothing about the upstream
                self.upstream_ok = True
            if pool_key is not None:
                self._keys.report_success(pool_key)
            return

    def _next_key(self, tried: list[str], refused: UpstreamFailed | None) -> str:
        """The next usable pool key. None left: busy while a key cools, else the refusal that made us
        look (or, with every key disabled, a refusal of the pool)."""
        key = self._keys.pick(exclude=tried)
        if key is None:
            if not self._keys:
                raise NoServerKey("the server has no upstream key")
            wait = self._keys.wait()
            if wait is not None:
                raise Busy(wait)
            raise refused or UpstreamFailed("pool_refused", host=self._hosts.get(self._pool_provider.name, ""))
        tried.append(key)
        return key

    @staticmethod
    def _retryable(failure: UpstreamFailed, tried: list[str]) -> bool:
        """Only a refusal of the first pool key, and only one that is about the key."""
        return len(tried) == 1 and failure.kind == "pool_refused" and failure.status in KEY_REFUSALS

    def _busy_or(self, failure: UpstreamFailed) -> Exception:
        """A 429 on the pool's last try means every key is cooling: that is "busy", not a failure."""
        if failure.kind == "pool_refused" and failure.status == 429 and failure.code != "insufficient_quota":
            wait = self._keys.wait()
            if wait is not None:
                return Busy(wait)
        return failure

    def failed(self, provider: str, exc: BaseException, pool_key: str | None = None,
               subject: Literal["answer", "picture"] = "answer") -> UpstreamFailed:
        """Account one upstream failure (key health, reachability, metrics, one log line) and say what
        the client may learn of it."""
        status = str(exc.status) if isinstance(exc, UpstreamError) else type(exc).__name__
        if pool_key is not None:
            self._report(pool_key, exc)
        if isinstance(exc, (UpstreamUnreachable, asyncio.TimeoutError)) or (
                isinstance(exc, UpstreamError) and exc.status >= 500):
            self.upstream_ok = False
        self._meter.upstream_failed(status, mask(pool_key) if pool_key else provider)
        log.warning("upstream %s failed (%s, key %s): %s", provider, status,
                    mask(pool_key) if pool_key else "caller's own", exc)
        return failure_of(exc, pool_key is not None, self._hosts.get(provider, ""), subject)

    def _report(self, key: str, exc: BaseException) -> None:
        """Key health from an upstream failure: cool on 429, disable on 401 / insufficient_quota."""
        if isinstance(exc, UpstreamError) and (exc.status == 401 or exc.code == "insufficient_quota"):
            self._keys.report_invalid(key, exc.code or f"HTTP {exc.status}")
        elif isinstance(exc, UpstreamError) and exc.status == 429:
            self._keys.report_rate_limited(key, retry_after_from_headers(exc.headers))
        else:
            self._keys.report_error(key)
