"""The connection to Redis shared by the Redis store's parts: up or down, and what to do when down.

While Redis is unreachable, calls fall back to the in-process store (`state.redis_fail: open`) or a
quota call refuses (`closed`). A background task pings every `POLL_SECONDS`; once Redis answers it is
used again without a restart. One log line when Redis goes and one when it comes back; the metrics
`chatgpt_redis_up` and `chatgpt_redis_errors_total` follow.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatgpt.domain.store import StoreUnavailable
from chatgpt.server.local_store import LocalStore
from chatgpt.server.logs import redacted
from chatgpt.server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 0.5
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)




def as_text(value: bytes | str) -> str:
    """A reply as text (the client decodes replies; redis-py types them as bytes | str)."""
    return value.decode() if isinstance(value, bytes) else value


def json_object(text: str) -> dict[str, Any] | None:
    """A JSON object from Redis, or None for anything else (a hand-edited or foreign value)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class RedisLink:
    """A Redis client that knows whether Redis answers, with the in-process store to fall back on."""

    def __init__(self, url: str, fail: str, local: LocalStore, *, prefix: str = "chatgpt:",
                 metrics: Metrics | None = None, poll_seconds: float = POLL_SECONDS, timeout: float = 2.0) -> None:
        """Use Redis at `url`; `fail` is `open` (count locally while down) or `closed` (refuse)."""
        self.where = redacted(url)
        self.fail = fail
        self.local = local
        self.prefix = prefix
        self.up = False
        self.poll_seconds = poll_seconds
        self._metrics = metrics
        # One quick retry on a fresh connection (a pooled one is stale after a Redis restart), no
        # backoff, and never on a timeout: a command that may have run is not sent twice.
        self._client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=min(timeout, 1.0),
                                      socket_timeout=timeout, retry=Retry(NoBackoff(), 1, (RedisConnectionError,)))
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()  # set by a change notice: sync now instead of at the next poll
        self._closing = asyncio.Event()  # set by close(): the background loops end
        self._reported_down = False

    def _k(self, name: str) -> str:
        return self.prefix + name

    async def start(self) -> None:
        """First contact (a Redis that is down now is retried in the background), then keep in step."""
        await self.sync()
        if self.up:
            log.info("shared state in redis at %s (state.redis_fail: %s)", self.where, self.fail)
        self._tasks = [asyncio.create_task(self._sync_forever()), asyncio.create_task(self._listen_forever())]

    async def close(self) -> None:
        """Stop the background tasks and close the connections. The tasks are cancelled and also told
        to stop: a cancellation that arrives while redis-py runs a command can come back as a
        connection error, which the sync loop takes for Redis going down, and the task would then wait
        for the next change for ever (it hung one test run in a hundred)."""
        self._closing.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        # gather with return_exceptions: the tasks' own cancellations are results, while a cancellation
        # of this close() itself still goes up (suppress(CancelledError) around `await task` ate it).
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _sync_forever(self) -> None:
        while not self._closing.is_set():
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that races with
            # a change notice setting _wake.
            with suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if not self._closing.is_set():
                await self.sync()

    async def _pause(self) -> None:
        """Wait poll_seconds, or until close()."""
        with suppress(TimeoutError):
            async with asyncio.timeout(self.poll_seconds):
                await self._closing.wait()

    async def _listen_forever(self) -> None:
        """Change notices (pub/sub) wake the sync at once; the poll stays as the safety net (a notice
        published while this connection was down is not delivered)."""
        while not self._closing.is_set():
            if not self.up:
                await self._pause()
                continue
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._k("changes"))
                    while not self._closing.is_set():
                        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is not None:
                            self._wake.set()
            except UNREACHABLE:
                await self._pause()  # the sync task notices and reports Redis down
            except Exception:
                log.exception("redis change notices failed; polling meanwhile")
                await self._pause()

    async def sync(self) -> None:
        """One round of the background task: reconnect when down, pull changed flags and key health."""
        try:
            if not self.up:
                await self._client.ping()
                await self._came_up()
            await self._poll()
        except UNREACHABLE as exc:
            self._went_down(exc)
        except Exception:  # a bad value in Redis must not end the task
            log.exception("redis sync failed; will retry")

    async def _came_up(self) -> None:
        self.up = True
        if self._metrics is not None:
            self._metrics.redis_up.set(1)
        if self._reported_down:
            self._reported_down = False
            log.warning("redis at %s reachable again: shared state used again", self.where)
        await self._resume()

    async def _resume(self) -> None:
        """Redis answers again: send what waited (the mirror overrides this)."""

    async def _poll(self) -> None:
        """One round of pulling changes (the mirror overrides this)."""

    def _forget(self) -> None:
        """Redis went away: what was pulled must be pulled again (the mirror overrides this)."""

    def _went_down(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.redis_errors.inc()
            self._metrics.redis_up.set(0)
        self.up = False
        self._forget()
        if not self._reported_down:
            self._reported_down = True
            then = ("counting locally" if self.fail == "open" else "refusing questions that need the shared quota")
            log.warning("redis at %s unreachable (%s): %s until it answers (state.redis_fail: %s)",
                        self.where, type(exc).__name__, then, self.fail)

    async def _shared(self, call: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]], *,
                      quota: bool = False) -> T:
        """Run `call` on Redis; while Redis is unreachable, `local` instead (or refuse, for a quota)."""
        if self.up:
            try:
                return await call()
            except UNREACHABLE as exc:
                self._went_down(exc)
            except RedisError:  # Redis answered, with an error (a foreign value under our key...)
                log.exception("redis refused a command; this call uses the local store")
                if self._metrics is not None:
                    self._metrics.redis_errors.inc()
        if quota and self.fail == "closed":
            raise StoreUnavailable(f"redis at {self.where} is unreachable")
        return await local()

    async def _hgetall(self, key: str) -> dict[str, str]:
        return {as_text(name): as_text(value) for name, value in (await self._client.hgetall(key)).items()}
