"""The one pipeline every entry point shares: admit, check quota, pick provider and key, stream."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from chatgpt.domain import texts
from chatgpt.domain.errors import (
    ServiceError,
    UpstreamBroken,
    UpstreamError,
    UpstreamUnreachable,
    from_upstream,
)
from chatgpt.server.images import ImageStore, StoredImage
from chatgpt.domain.failover import NoKeyLeft, Upstream, call_first_good, stream_first_good
from chatgpt.domain.keypool import KeyPool, mask, retry_after_from_headers
from chatgpt.domain.limits import LimiterTable
from chatgpt.server.metrics import Metrics, QuestionRecord
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage, Provider
from chatgpt.domain.question import Question, fit_context
from chatgpt.domain.quota import DailyQuota
from chatgpt.domain.routes import RouteTable
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.settings import Settings

log = logging.getLogger(__name__)

UPSTREAM_FAILURES = (UpstreamError, UpstreamUnreachable, UpstreamBroken, asyncio.TimeoutError)
T = TypeVar("T")


def outcome_of(exc: BaseException) -> str:
    """A short outcome label for metrics and the question log line."""
    if isinstance(exc, ServiceError):
        if exc.error_code == "daily_quota_exceeded":
            return "quota"
        return "upstream_error" if isinstance(exc.__cause__, UPSTREAM_FAILURES) else "refused"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "client_left"
    return "error"


def public_error(exc: BaseException, pool_key: str | None) -> ServiceError:
    """What the client is told of an upstream failure. A refusal of one of the server's keys is the
    operator's business (its message names the key or the organisation): the client gets a generic
    failure instead. On the caller's own key, the upstream's message is relayed as is."""
    error = from_upstream(exc, own_key=pool_key is None)
    if pool_key is not None and isinstance(exc, UpstreamError) and (
            exc.status in (401, 403, 429) or exc.code == "insufficient_quota"):
        return ServiceError("500001", texts.UPSTREAM_FAILED, http_status=503, error_type="api_error",
                            retry_after=error.retry_after, detail=error.detail)
    return error


def _retryable(error: ServiceError, tried: list[str]) -> bool:
    """A key-specific refusal (401/403/429) on the first key is retried once on the next key."""
    cause = error.__cause__
    return len(tried) == 1 and isinstance(cause, UpstreamError) and cause.status in (401, 403, 429)


class ChatPipeline:
    """Turns a question into answer deltas, charging and refunding as PROTOCOL.md says."""

    def __init__(self, settings: Settings, flags: RuntimeFlags, routes: RouteTable[Upstream], quota: DailyQuota,
                 debug_quota: DailyQuota, limiters: dict[str, LimiterTable], offline: Provider | None,
                 debug_provider: Provider, images: ImageStore, metrics: Metrics) -> None:
        self.settings = settings
        self.flags = flags
        self.routes = routes
        self.keys: KeyPool = routes.upstreams[0].keys  # the first upstream's pool (one-upstream callers)
        self.quota = quota
        self.debug_quota = debug_quota  # the Baixing relay's own per-IP day limit
        self.limiters = limiters
        self.offline = offline  # set when no upstream has a key: it answers every question on the pools
        self.debug_provider = debug_provider
        self.images = images
        self.metrics = metrics
        self.upstream_ok: bool | None = None  # None until the upstream has answered or failed once

    async def admit(self, entry: str, identity: str) -> None:
        """Maintenance, then the per-IP limiter of this entry point; raises a refusal."""
        if not self.flags.serving:
            raise ServiceError("700001", texts.MAINTENANCE, http_status=503, error_type="server_error")
        limiter = self.limiters.get(entry)
        if limiter is not None and not await limiter.allow(identity):
            text = texts.WS_TOO_FAST if entry == "ws" else texts.HTTP_TOO_FAST
            self.metrics.limiter_refusals.labels(entry).inc()
            raise ServiceError("700001", text, http_status=429, error_type="rate_limit_exceeded",
                               retry_after=limiter.retry_after(identity))

    def choose_model(self, requested: Any, *, strict: bool) -> str:
        """A client's model is honoured only when listed; `strict` refuses an unlisted one instead."""
        if not isinstance(requested, str) or not requested.strip():
            return self.routes.default
        if self.routes.offers(requested):
            return requested
        if strict:
            raise ServiceError("300001", f"The model `{requested[:100]}` is not available on this server.",
                               http_status=404, error_code="model_not_found")
        return self.routes.default

    def remaining(self, identity: str) -> int:
        """Questions an anonymous identity has left today."""
        self.quota.limit = self.flags.demoLimit
        return self.quota.remaining(identity)

    def _request(self, question: Question) -> ChatRequest:
        upstream = self.settings.upstream
        history = fit_context(question.messages, upstream.context_chars) if question.trim else question.messages
        if upstream.system_prompt and question.payer.kind != "own":
            history = [{"role": "system", "content": upstream.system_prompt}, *history]
        # The server's defaults and cap apply when the operator pays; on the caller's own key the
        # request is the caller's (what it did not set is not sent).
        max_tokens, temperature = question.max_tokens, question.temperature
        if question.payer.kind != "own":
            max_tokens = min(max_tokens or upstream.max_tokens, upstream.max_tokens)
            temperature = upstream.temperature if temperature is None else temperature
        model = self.routes.resolve(question.model)  # what clients say -> what upstreams are asked
        return ChatRequest(history, model, temperature, max_tokens, question.extra)

    def _charge(self, question: Question, debug: bool) -> DailyQuota | None:
        """Count an anonymous question against its day quota; the quota to refund, if any."""
        if question.payer.kind != "anonymous":
            return None
        quota = self.debug_quota if debug else self.quota
        self.quota.limit = self.flags.demoLimit
        if not quota.take(question.identity):
            self.metrics.quota_refusals.labels(question.entry).inc()
            raise ServiceError("700001", texts.QUOTA_USED_UP, http_status=429,
                               error_type="insufficient_quota", error_code="daily_quota_exceeded")
        return quota

    async def answer(self, question: Question) -> AsyncIterator[Delta]:
        """Stream the answer's deltas; raise ServiceError on refusal or failure."""
        request = self._request(question)
        debug = self.flags.debug and question.payer.kind != "own"
        record = self._record(question, "chat")
        quota = None
        try:
            quota = self._charge(question, debug)
            source = self._relay(None, self.debug_provider, request, None, None) if debug else self._stream(question, request)
            async with aclosing(source) as deltas:
                async for delta in deltas:
                    if delta.text or delta.reasoning or delta.tool_call:
                        record.token()
                    if delta.usage is not None:
                        record.usage = delta.usage
                    yield delta
        except BaseException as exc:
            record.outcome = outcome_of(exc)
            # Given back only when the upstream produced nothing: a client that leaves mid-answer
            # has been answered (and billed), so it is charged (PROTOCOL.md A.5, C.2).
            if quota is not None and not record.tokens:
                quota.refund(question.identity)
            raise
        finally:
            self.metrics.finish(record)

    def _record(self, question: Question, kind: str) -> QuestionRecord:
        record = self.metrics.start(question.entry, question.identity, kind)
        # An own-key caller may name any model: only the offered ones become metric labels.
        record.model = question.model if self.routes.offers(question.model) else "other"
        record.payer = {"anonymous": "pool", "trusted": "trusted", "own": "own"}[question.payer.kind]
        if self.settings.logging.prompts:
            users = [m.get("content") for m in question.messages if m.get("role") == "user"]
            record.prompt = str(users[-1])[:2000] if users else ""
        return record

    async def _stream(self, question: Question, request: ChatRequest) -> AsyncIterator[Delta]:
        if question.payer.kind == "own" or self.offline is not None:
            # A caller's own key goes to one upstream only: it must not be shown to another provider.
            upstream = self.routes.for_own_key(request.model)
            provider = upstream.provider if question.payer.kind == "own" else self.offline
            assert provider is not None
            async with aclosing(self._relay(upstream, provider, request, question.payer.key, None)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        candidates = self.routes.serving(request.model)
        async with aclosing(stream_first_good(candidates, lambda up: self._stream_on(up, request))) as deltas:
            async for delta in deltas:
                yield delta

    async def _stream_on(self, upstream: Upstream, request: ChatRequest) -> AsyncGenerator[Delta, None]:
        """One upstream's answer on its own pool: one retry on its next key after a key refusal."""
        tried: list[str] = []
        refused: ServiceError | None = None
        while True:
            key = self._next_key(upstream.keys, tried, refused)
            produced = False
            try:
                async with aclosing(self._relay(upstream, upstream.provider, request, key, key)) as deltas:
                    async for delta in deltas:
                        produced = True
                        yield delta
                return
            except ServiceError as error:
                # One retry on the next key, only for a key-specific refusal before any text was
                # sent: a broken stream is never re-POSTed (it may already be billed).
                if produced or not _retryable(error, tried):
                    raise
                refused = error
                log.info("key %s refused (HTTP %s); retrying once on the next key", mask(key),
                         getattr(error.__cause__, "status", "?"))

    def _next_key(self, keys: KeyPool, tried: list[str], refused: ServiceError | None) -> str:
        """The next usable pool key; with none left, the refusal that made us look (or 'no key')."""
        key = keys.pick(exclude=tried)
        if key is None:
            if refused is not None:
                raise refused
            raise ServiceError("500001", texts.NO_SERVER_KEY, http_status=503,
                               error_type="api_error") from NoKeyLeft()
        tried.append(key)
        return key

    async def image(self, question: Question, prompt: str, size: str | None = None) -> StoredImage:
        """Generate one picture for `prompt` and save it; charged like a chat question."""
        record = self._record(question, "image")
        quota = None
        try:
            quota = self._charge(question, debug=False)
            generated = await self._generate(question, prompt, size or self.settings.images.size)
            stored = await self._call(None, self.images.store(generated), None)  # a download, for URL answers
            record.token()
            return stored
        except BaseException as exc:
            record.outcome = outcome_of(exc)
            if quota is not None:
                quota.refund(question.identity)  # the user got no picture
            raise
        finally:
            self.metrics.finish(record)

    async def _generate(self, question: Question, prompt: str, size: str) -> GeneratedImage:
        model = self.routes.resolve(self.routes.image) if self.routes.image else None
        if self.offline is not None and question.payer.kind != "own":
            return await self.offline.generate_image(prompt, size, None, model)
        drawing = self.routes.drawing()
        if not drawing:
            raise ServiceError("500001", texts.NO_IMAGES, http_status=400, error_code="images_not_offered")
        if question.payer.kind == "own":  # the first upstream that draws, and that one only
            upstream = drawing[0]
            return await self._call(upstream, upstream.provider.generate_image(prompt, size, question.payer.key,
                                                                               model), None)
        return await call_first_good(drawing, lambda up: self._draw_on(up, prompt, size, model))

    async def _draw_on(self, upstream: Upstream, prompt: str, size: str, model: str | None) -> GeneratedImage:
        """One picture from one upstream on its own pool, with one retry on its next key."""
        tried: list[str] = []
        refused: ServiceError | None = None
        while True:
            key = self._next_key(upstream.keys, tried, refused)
            try:
                return await self._call(upstream, upstream.provider.generate_image(prompt, size, key, model), key)
            except ServiceError as error:
                if not _retryable(error, tried):
                    raise
                refused = error

    async def _call(self, upstream: Upstream | None, call: Awaitable[T], pool_key: str | None) -> T:
        """Await one upstream call (None: a picture download), mapping failures and reporting key health
        like `_relay`."""
        if upstream is not None and pool_key is not None:
            upstream.keys.record_request(pool_key)
        try:
            result = await call
        except UPSTREAM_FAILURES as exc:
            self._failed(upstream, pool_key, exc)
            raise public_error(exc, pool_key) from exc
        if upstream is not None:
            self.upstream_ok = upstream.reachable = True
            if pool_key is not None:
                upstream.keys.report_success(pool_key)
        return result

    async def _relay(self, upstream: Upstream | None, provider: Provider, request: ChatRequest, key: str | None,
                     pool_key: str | None) -> AsyncIterator[Delta]:
        """Relay one provider stream, mapping upstream failures and reporting key health."""
        if upstream is not None and pool_key is not None:
            upstream.keys.record_request(pool_key)
        try:
            async with aclosing(provider.stream(request, key)) as deltas:
                async for delta in deltas:
                    if delta.usage is not None and upstream is not None and pool_key is not None:
                        upstream.keys.record_usage(pool_key, delta.usage.prompt, delta.usage.completion,
                                                   delta.usage.reasoning)
                    yield delta
        except UPSTREAM_FAILURES as exc:
            self._failed(upstream, pool_key, exc)
            raise public_error(exc, pool_key) from exc
        if upstream is None or provider.name == "offline":
            return  # the Baixing relay and the built-in provider say nothing about the upstreams
        self.upstream_ok = upstream.reachable = True
        if pool_key is not None:
            upstream.keys.report_success(pool_key)

    def _failed(self, upstream: Upstream | None, pool_key: str | None, exc: BaseException) -> None:
        """Account one upstream failure: key health, the reachable flag, metrics and one log line."""
        status = str(exc.status) if isinstance(exc, UpstreamError) else type(exc).__name__
        name = upstream.name if upstream is not None else "picture download"
        if upstream is not None:
            if pool_key is not None:
                self._report(upstream.keys, pool_key, exc)
            if isinstance(exc, (UpstreamUnreachable, asyncio.TimeoutError)) or (
                    isinstance(exc, UpstreamError) and exc.status >= 500):
                self.upstream_ok = upstream.reachable = False
        self.metrics.upstream_errors.labels(name, status, mask(pool_key) if pool_key else "own").inc()
        log.warning("upstream %s failed (%s, key %s): %s", name, status,
                    mask(pool_key) if pool_key else "caller's own", exc)

    def _report(self, keys: KeyPool, key: str, exc: BaseException) -> None:
        """Key health from an upstream failure: cool on 429, disable on 401 / insufficient_quota."""
        if isinstance(exc, UpstreamError) and (exc.status == 401 or exc.code == "insufficient_quota"):
            keys.report_invalid(key, exc.code or f"HTTP {exc.status}")
        elif isinstance(exc, UpstreamError) and exc.status == 429:
            keys.report_rate_limited(key, retry_after_from_headers(exc.headers))
        else:
            keys.report_error(key)
