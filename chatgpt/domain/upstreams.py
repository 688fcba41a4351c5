"""Which upstream and key answer a question, the one key-retry orchestration for chat and pictures
(inside the fall-over between upstreams), and what an upstream failure becomes (key health,
reachability, metrics, what the client may learn)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import (
    Busy,
    NoServerKey,
    PicturesNotOffered,
    UpstreamBroken,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from chatgpt.domain.failover import Upstream, stream_first_good
from chatgpt.domain.keypool import KeyPool, mask, retry_after_from_headers
from chatgpt.domain.provider import Provider
from chatgpt.domain.question import Payer
from chatgpt.domain.routes import RouteTable

log = logging.getLogger(__name__)

T = TypeVar("T")
UPSTREAM_FAILURES = (UpstreamError, UpstreamUnreachable, UpstreamBroken, asyncio.TimeoutError)
KEY_REFUSALS = (401, 403, 429)  # statuses that are about the key, not the question: retried on the next key
# One call to a provider with a key: what it yields (answer deltas, or the one picture drawn).
Attempt = Callable[[Provider, "str | None"], AsyncIterator[T]]
Subject = Literal["answer", "picture"]


class opened(Generic[T]):  # noqa: N801  (used as a function: `async with opened(stream)`)
    """`contextlib.aclosing` for any async iterator: an async generator is closed on the way out, so
    an upstream request is cancelled as soon as nobody reads its answer. A class, not an
    `@asynccontextmanager`: it is entered several times per answer, and a generator-based one costs
    an async generator (registered with the loop) and its machinery each time."""

    __slots__ = ("_stream",)

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self._stream = stream

    async def __aenter__(self) -> AsyncIterator[T]:
        return self._stream

    async def __aexit__(self, *exc: object) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class Progress:
    """How far one question got: the refund rule depends on it (PROTOCOL.md E.1)."""

    asked: bool = False  # a request went upstream
    produced: bool = False  # the upstream gave something of an answer (text, reasoning, a tool call, a picture)
    upstream: Upstream | None = None  # who was asked last (None: a built-in provider)
    pool_key: str | None = None  # the server's key of the last request (its tokens are counted against it)


@dataclass(frozen=True)
class Route:
    """Who answers a question: upstreams in fall-over order on their own pools, one upstream with the
    caller's own key, or a provider that needs neither (the offline one, the Baixing relay)."""

    upstreams: tuple[Upstream, ...] = ()
    key: str | None = None  # the caller's own key (never stored or logged)
    provider: Provider | None = None  # answers without an upstream's pool
    debug: bool = False  # the Baixing relay (runtime flag isDebug): its own day limit

    @property
    def free(self) -> bool:
        """The built-in offline provider's answers cost nobody anything (PROTOCOL.md E.1)."""
        return self.provider is not None and self.provider.name == "offline"


def hostname(base_url: str) -> str:
    """The host an upstream URL points at, for "could not reach <host>" (never a path or credential)."""
    return urlsplit(base_url).hostname or ""


def failure_of(exc: BaseException, pooled: bool, host: str, subject: Subject = "answer") -> UpstreamFailed:
    """What the client may learn of an upstream failure. A refusal of one of the server's keys is the
    operator's business (its message names the key or the organisation): no upstream message then."""
    if isinstance(exc, UpstreamError):
        if pooled and (exc.status in KEY_REFUSALS or exc.code == "insufficient_quota"):
            return UpstreamFailed("pool_refused", status=exc.status, code=exc.code, host=host, subject=subject)
        if exc.status < 400:  # a 2xx that is not the stream that was asked for
            return UpstreamFailed("broken", status=exc.status, host=host, subject=subject)
        retry_after = retry_after_from_headers(exc.headers) if exc.status == 429 else None
        return UpstreamFailed("error" if exc.status >= 500 else "refused", status=exc.status,
                              message=exc.message, code=exc.code, retry_after=retry_after, host=host, subject=subject)
    if isinstance(exc, UpstreamUnreachable):
        return UpstreamFailed("unreachable", host=host, subject=subject)
    if isinstance(exc, (UpstreamTimeout, asyncio.TimeoutError)):
        detail = str(exc) if isinstance(exc, UpstreamTimeout) and str(exc) else None
        return UpstreamFailed("timeout", host=host, subject=subject, detail=detail)
    return UpstreamFailed("broken", host=host, subject=subject)


class Upstreams:
    """The routing table's upstreams (each with its provider and key pool), the offline provider when
    no upstream has a key, the Baixing relay, and whether an upstream answered the last time."""

    def __init__(self, routes: RouteTable[Upstream], offline: Provider | None, debug_provider: Provider,
                 meter: Meter) -> None:
        self._routes = routes
        self._offline = offline  # set when no upstream has a key: it answers every question on the pools
        self._debug_provider = debug_provider
        self._meter = meter
        self.upstream_ok: bool | None = None  # None until an upstream has answered or failed once

    def resolve(self, model: str) -> str:
        """What the upstreams are asked for when a client says `model`."""
        return self._routes.resolve(model)

    def offers(self, model: str) -> bool:
        """True when `model` (or the alias) is served on the server's keys."""
        return self._routes.offers(model)

    @property
    def default_model(self) -> str:
        """The model of a question that names none."""
        return self._routes.default

    def image_model(self) -> str | None:
        """The model pictures are asked of (None: the upstream's default)."""
        return self._routes.resolve(self._routes.image) if self._routes.image else None

    def route(self, payer: Payer, model: str, *, debug: bool = False) -> Route:
        """A chat question: the caller's own key → the one upstream serving the model; isDebug → the
        Baixing relay; no upstream with a key → offline; else the upstreams serving it, in order."""
        if payer.kind == "own":
            return Route((self._routes.for_own_key(model),), key=payer.key)
        if debug:
            return Route(provider=self._debug_provider, debug=True)
        if self._offline is not None:
            return Route(provider=self._offline)
        return Route(tuple(self._routes.serving(model)))

    def drawing(self, payer: Payer) -> Route:
        """A picture: like a chat question, among the upstreams that draw the image model."""
        if payer.kind != "own" and self._offline is not None:
            return Route(provider=self._offline)
        drawing = self._routes.drawing()
        if not drawing:
            raise PicturesNotOffered("no upstream draws pictures")
        if payer.kind == "own":
            return Route((drawing[0],), key=payer.key)  # the first that draws, and that one only
        return Route(tuple(drawing))

    def health(self) -> dict[str, Any]:
        """Key counts and upstream reachability, for `/healthz`."""
        pools = [u.keys for u in self._routes.upstreams]
        return {"keys": {"configured": sum(len(p) for p in pools), "healthy": sum(p.usable() for p in pools)},
                "upstream_reachable": self.upstream_ok}

    def call(self, route: Route, attempt: Attempt[T], progress: Progress) -> AsyncGenerator[T, None]:
        """Run `attempt` where the route says. On the pools: the first upstream that gets as far as its
        first item answers (PROTOCOL.md E.4), each with one retry on its next key after a key refusal.
        Nothing that yielded anything is ever re-sent (it may already be billed)."""
        if route.provider is not None:
            return self._attempt(None, route.provider, route.key, None, attempt, progress)
        if route.key is not None:
            return self._attempt(route.upstreams[0], route.upstreams[0].provider, route.key, None, attempt, progress)
        if len(route.upstreams) == 1:  # the usual case: no fall-over layer per answer piece
            return self._on_pool(route.upstreams[0], attempt, progress)
        return stream_first_good(route.upstreams, lambda upstream: self._on_pool(upstream, attempt, progress))

    async def _on_pool(self, upstream: Upstream, attempt: Attempt[T], progress: Progress) -> AsyncGenerator[T, None]:
        """One upstream on its own pool: a key refusal before anything was yielded moves to its next key, once."""
        tried: list[str] = []
        refused: UpstreamFailed | None = None
        while True:
            key = self._next_key(upstream, tried, refused)
            yielded = False
            self._asking(upstream, key, progress)
            try:
                # `_attempt` inlined: one generator layer fewer for every answer event on the usual path.
                try:
                    async with opened(attempt(upstream.provider, key)) as items:
                        async for item in items:
                            yielded = True
                            yield item
                except UPSTREAM_FAILURES as exc:
                    raise self.failed(upstream.name, exc, upstream, key, host=hostname(upstream.base_url)) from exc
                self._answered(upstream, key)
                return
            except UpstreamFailed as failure:
                if yielded or not self._retryable(failure, tried):
                    raise self._busy_or(upstream.keys, failure) from failure.__cause__
                refused = failure
                log.info("upstream %s key %s refused (HTTP %s); retrying once on the next key", upstream.name,
                         mask(key), failure.status)

    async def _attempt(self, upstream: Upstream | None, provider: Provider, key: str | None, pool_key: str | None,
                       attempt: Attempt[T], progress: Progress) -> AsyncGenerator[T, None]:
        """One request: failures mapped and accounted, key health and reachability reported."""
        self._asking(upstream, pool_key, progress)
        try:
            async with opened(attempt(provider, key)) as items:
                async for item in items:
                    yield item
        except UPSTREAM_FAILURES as exc:
            name = upstream.name if upstream is not None else provider.name
            host = hostname(upstream.base_url) if upstream is not None else ""
            raise self.failed(name, exc, upstream, pool_key, host=host) from exc
        if upstream is not None:  # the Baixing relay and the built-in provider say nothing about the upstreams
            self._answered(upstream, pool_key)

    @staticmethod
    def _asking(upstream: Upstream | None, pool_key: str | None, progress: Progress) -> None:
        """A request is about to go upstream."""
        if upstream is not None and pool_key is not None:
            upstream.keys.record_request(pool_key)
        progress.asked = True
        progress.upstream, progress.pool_key = upstream, pool_key

    def _answered(self, upstream: Upstream, pool_key: str | None) -> None:
        """An upstream answered to the end: it is reachable and its key works."""
        self.upstream_ok = upstream.reachable = True
        if pool_key is not None:
            upstream.keys.report_success(pool_key)

    def _next_key(self, upstream: Upstream, tried: list[str], refused: UpstreamFailed | None) -> str:
        """The upstream's next usable key. None left: busy while a key cools, else the refusal that made
        us look (or, with every key disabled, a refusal of the pool)."""
        key = upstream.keys.pick(exclude=tried)
        if key is None:
            if not upstream.keys:
                raise NoServerKey(f"upstream {upstream.name} has no key")
            wait = upstream.keys.wait()
            if wait is not None:
                raise Busy(wait)
            raise refused or UpstreamFailed("pool_refused", host=hostname(upstream.base_url))
        tried.append(key)
        return key

    @staticmethod
    def _retryable(failure: UpstreamFailed, tried: list[str]) -> bool:
        """Only a refusal of the first pool key, and only one that is about the key."""
        return len(tried) == 1 and failure.kind == "pool_refused" and failure.status in KEY_REFUSALS

    @staticmethod
    def _busy_or(keys: KeyPool, failure: UpstreamFailed) -> Exception:
        """A 429 on the pool's last try means every key is cooling: that is "busy", not a failure."""
        if failure.kind == "pool_refused" and failure.status == 429 and failure.code != "insufficient_quota":
            wait = keys.wait()
            if wait is not None:
                return Busy(wait)
        return failure

    def failed(self, name: str, exc: BaseException, upstream: Upstream | None = None, pool_key: str | None = None,
               *, host: str = "", subject: Subject = "answer") -> UpstreamFailed:
        """Account one upstream failure (key health, reachability, metrics, one log line) and say what
        the client may learn of it."""
        status = str(exc.status) if isinstance(exc, UpstreamError) else type(exc).__name__
        if upstream is not None:
            if pool_key is not None:
                self._report(upstream.keys, pool_key, exc)
            if isinstance(exc, (UpstreamUnreachable, asyncio.TimeoutError)) or (
                    isinstance(exc, UpstreamError) and exc.status >= 500):
                self.upstream_ok = upstream.reachable = False
        self._meter.upstream_failed(name, status, mask(pool_key) if pool_key else "own")
        log.warning("upstream %s failed (%s, key %s): %s", name, status,
                    mask(pool_key) if pool_key else "caller's own", exc)
        return failure_of(exc, pool_key is not None, host, subject)

    @staticmethod
    def _report(keys: KeyPool, key: str, exc: BaseException) -> None:
        """Key health from an upstream failure: cool on 429, disable on 401 / insufficient_quota."""
        if isinstance(exc, UpstreamError) and (exc.status == 401 or exc.code == "insufficient_quota"):
            keys.report_invalid(key, exc.code or f"HTTP {exc.status}")
        elif isinstance(exc, UpstreamError) and exc.status == 429:
            keys.report_rate_limited(key, retry_after_from_headers(exc.headers))
        else:
            keys.report_error(key)
