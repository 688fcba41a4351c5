"""The Redis store: state shared by several instances (redis-py's asyncio client).

Counters are taken with a Lua script (check, count and EXPIREAT the next local midnight in one step).
Flags and key health are hashes with a version key; a change is announced on a pub/sub channel, which
makes every instance pull at once, and each instance also polls the versions (`POLL_SECONDS`), so a
change reaches the others within a second even when a notice is lost. While Redis is unreachable the instance falls back to its
in-process store (`state.redis_fail: open`) or refuses what needs the shared quota (`closed`), and a
background task keeps pinging: once Redis answers, it is used again and whatever it lost (flags) is
written back from this instance.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatgpt.domain.store import FlagsWatcher, HealthWatcher, StoreUnavailable, counts_of, next_midnight
from chatgpt.server.local_store import LocalStore
from chatgpt.server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 0.5
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)

# KEYS[1] counter; ARGV[1] limit, ARGV[2] epoch of the next local midnight. 1 taken, 0 none left.
TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return 1
"""
# KEYS[1] counter. Never below zero; a counter of another day is another key, so nothing is given.
REFUND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used <= 1 then redis.call('DEL', KEYS[1]) return 0 end
return redis.call('DECR', KEYS[1])
"""
# KEYS[1] conversation, KEYS[2] index (id by save time); ARGV: record, ttl ms, now s, id, limit, key prefix.
SAVE_CONVERSATION = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]) / 1000)
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if extra > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, extra - 1)) do redis.call('DEL', ARGV[6] .. id) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""
# KEYS[1] failure counter; ARGV[1] window ms. The window starts at the first failure.
FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# KEYS[1] secret; ARGV[1] a fresh random value, kept only if nobody made one before.
SECRET = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


def redacted(url: str) -> str:
    """The Redis URL as logs show it: scheme, host, port and database, never a user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis (unparsable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _text(value: bytes | str) -> str:
    """A reply as text (the client decodes replies; redis-py types them as bytes | str)."""
    return value.decode() if isinstance(value, bytes) else value


def _dict(text: str) -> dict[str, Any] | None:
    """A JSON object from Redis, or None for anything else (a hand-edited or foreign value)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class RedisStore:
    """`Store` on Redis, with the in-process store as its fallback while Redis is unreachable."""

    shared = True

    def __init__(self, url: str, fail: str, local: LocalStore, *, prefix: str = "chatgpt:",
                 metrics: Metrics | None = None, clock: Callable[[], datetime] = datetime.now,
                 wall: Callable[[], float] = time.time, poll_seconds: float = POLL_SECONDS, timeout: float = 2.0) -> None:
        """Use Redis at `url`; `fail` is `open` (count locally while down) or `closed` (refuse)."""
        self.where = redacted(url)
        self.fail = fail
        self.local = local
        self.prefix = prefix
        self.up = False
        self.poll_seconds = poll_seconds
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        # One quick retry on a fresh connection (a pooled one is stale after a Redis restart), no
        # backoff, and never on a timeout: a command that may have run is not sent twice.
        self._client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=min(timeout, 1.0),
                                      socket_timeout=timeout, retry=Retry(NoBackoff(), 1, (RedisConnectionError,)))
        self._take, self._refund = self._client.register_script(TAKE), self._client.register_script(REFUND)
        self._save_chat = self._client.register_script(SAVE_CONVERSATION)
        self._fail, self._secret = self._client.register_script(FAIL), self._client.register_script(SECRET)
        self._flag_watchers: list[tuple[FlagsWatcher, Callable[[], dict[str, Any]]]] = []
        self._health_watchers: list[HealthWatcher] = []
        self._versions: dict[str, str | None] = {}  # version key → value last pulled (absent: pull)
        self._pending_flags: dict[str, Any] = {}  # changed here while Redis was down
        self._pending_health: dict[str, dict[str, Any]] = {}
        self._secrets: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()  # set by a change notice: pull now instead of at the next poll
        self._reported_down = False

    def _k(self, name: str) -> str:
        return self.prefix + name

    # --- Connection health ---------------------------------------------------------------------------

    async def start(self) -> None:
        """First contact (a Redis that is down now is retried in the background), then keep in step."""
        await self.sync()
        if self.up:
            log.info("shared state in redis at %s (state.redis_fail: %s)", self.where, self.fail)
        self._tasks = [asyncio.create_task(self._sync_forever()), asyncio.create_task(self._listen_forever())]

    async def close(self) -> None:
        """Stop the background task and close the connections."""
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    async def _sync_forever(self) -> None:
        while True:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()
            await self.sync()

    async def _listen_forever(self) -> None:
        """Change notices (pub/sub) wake the sync at once; the poll stays as the safety net (a notice
        published while this connection was down is not delivered)."""
        while True:
            if not self.up:
                await asyncio.sleep(self.poll_seconds)
                continue
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self._k("changes"))
                    while True:
                        if await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is not None:
                            self._wake.set()
            except UNREACHABLE:
                await asyncio.sleep(self.poll_seconds)  # the sync task notices and reports Redis down
            except Exception:
                log.exception("redis change notices failed; polling meanwhile")
                await asyncio.sleep(self.poll_seconds)

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
        if self._pending_flags:
            await self._push_flags()
        for fingerprint in list(self._pending_health):
            await self._push_health(fingerprint)

    def _went_down(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.redis_errors.inc()
            self._metrics.redis_up.set(0)
        self.up = False
        self._versions.clear()  # everything is pulled again once Redis answers
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

    # --- Daily counters --------------------------------------------------------------------------------

    def _counter(self, counter: str, identity: str, now: datetime) -> str:
        # The day is part of the key: instances never mix days, and EXPIREAT only tidies up.
        return self._k(f"q:{counter}:{now.date().isoformat()}:{identity}")

    async def take(self, counter: str, identity: str, limit: int) -> bool:
        """Count one if below `limit`, atomically across instances."""
        now = self._clock()
        key, midnight = self._counter(counter, identity, now), int(next_midnight(now).timestamp())

        async def call() -> bool:
            return bool(await self._take(keys=[key], args=[limit, midnight]))
        return await self._shared(call, lambda: self.local.take(counter, identity, limit), quota=True)

    async def refund(self, counter: str, identity: str) -> None:
        """Give one back."""
        key = self._counter(counter, identity, self._clock())

        async def call() -> None:
            await self._refund(keys=[key])
        await self._shared(call, lambda: self.local.refund(counter, identity), quota=True)

    async def used(self, counter: str, identity: str) -> int:
        """Used today."""
        key = self._counter(counter, identity, self._clock())

        async def call() -> int:
            return int(await self._client.get(key) or 0)
        return await self._shared(call, lambda: self.local.used(counter, identity), quota=True)

    async def reset(self, counter: str, identity: str | None = None) -> int:
        """Clear one or all of today's counters (the local fallback's too)."""
        now = self._clock()
        local = await self.local.reset(counter, identity)

        async def call() -> int:
            if identity is not None:
                return int(await self._client.delete(self._counter(counter, identity, now)))
            pattern = self._k(f"q:{counter}:{now.date().isoformat()}:*")
            found = [key async for key in self._client.scan_iter(match=pattern, count=500)]
            cleared = 0
            for start in range(0, len(found), 500):
                cleared += int(await self._client.delete(*found[start:start + 500]))
            return cleared

        async def fallback() -> int:
            return local
        return await self._shared(call, fallback, quota=True)

    # --- Mirrored state: runtime flags and key health ----------------------------------------------------

    async def publish_flags(self, changes: dict[str, Any]) -> None:
        """Store changed flags and bump their version; kept to write later while Redis is down."""
        self._pending_flags.update(changes)
        if self.up:
            try:
                await self._push_flags()
            except UNREACHABLE as exc:
                self._went_down(exc)

    async def _push_flags(self) -> None:
        pending = dict(self._pending_flags)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("flags"), mapping={name: json.dumps(v) for name, v in pending.items()})
            pipe.incr(self._k("flags:v"))
            pipe.publish(self._k("changes"), "flags")
            await pipe.execute()
        for name, value in pending.items():
            if self._pending_flags.get(name) == value:
                del self._pending_flags[name]

    def watch_flags(self, apply: FlagsWatcher, current: Callable[[], dict[str, Any]]) -> None:
        """Call `apply` with the flags whenever they change in Redis."""
        self._flag_watchers.append((apply, current))

    async def publish_key_health(self, fingerprint: str, health: dict[str, Any]) -> None:
        """Store one key's health and bump the version; kept to write later while Redis is down."""
        self._pending_health[fingerprint] = health
        if self.up:
            try:
                await self._push_health(fingerprint)
            except UNREACHABLE as exc:
                self._went_down(exc)

    async def _push_health(self, fingerprint: str) -> None:
        health = self._pending_health[fingerprint]
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("keys"), fingerprint, json.dumps(health))
            pipe.incr(self._k("keys:v"))
            pipe.publish(self._k("changes"), "keys")
            await pipe.execute()
        if self._pending_health.get(fingerprint) is health:
            del self._pending_health[fingerprint]

    def watch_key_health(self, apply: HealthWatcher) -> None:
        """Call `apply` with every key's health whenever it changes in Redis."""
        self._health_watchers.append(apply)

    async def _poll(self) -> None:
        """One MGET of both versions; a changed (or vanished) one pulls its hash."""
        flags_v, keys_v = [None if v is None else _text(v)
                           for v in await self._client.mget(self._k("flags:v"), self._k("keys:v"))]
        if self._flag_watchers and ("flags" not in self._versions or self._versions["flags"] != flags_v):
            await self._pull_flags(flags_v)
        if self._health_watchers and ("keys" not in self._versions or self._versions["keys"] != keys_v):
            raw = await self._hgetall(self._k("keys"))
            records = {fp: record for fp, text in raw.items() if (record := _dict(text)) is not None}
            for apply_health in self._health_watchers:
                apply_health(records)
            self._versions["keys"] = keys_v

    async def _hgetall(self, key: str) -> dict[str, str]:
        return {_text(name): _text(value) for name, value in (await self._client.hgetall(key)).items()}

    async def _pull_flags(self, version: str | None) -> None:
        raw = await self._hgetall(self._k("flags"))
        values: dict[str, Any] = {}
        for name, text in raw.items():
            with suppress(ValueError):
                values[name] = json.loads(text)
        for apply, current in self._flag_watchers:
            if values:
                apply(values)
            missing = {name: value for name, value in current().items() if name not in values}
            if missing:  # a fresh or emptied Redis: this instance's values become everyone's
                async with self._client.pipeline(transaction=True) as pipe:
                    for name, value in missing.items():
                        pipe.hsetnx(self._k("flags"), name, json.dumps(value))
                    pipe.incr(self._k("flags:v"))
                    version = str((await pipe.execute())[-1])
                log.info("runtime flags %s were missing from redis: written from this instance",
                         ", ".join(sorted(missing)))
        self._versions["flags"] = version

    # --- `/chat` conversations -----------------------------------------------------------------------------

    async def load_conversation(self, cid: str) -> dict[str, Any] | None:
        """The record of `cid`, or None."""
        async def call() -> dict[str, Any] | None:
            text = await self._client.get(self._k(f"chat:{cid}"))
            return None if text is None else _dict(_text(text))
        return await self._shared(call, lambda: self.local.load_conversation(cid))

    async def save_conversation(self, cid: str, record: dict[str, Any], ttl: float, limit: int) -> None:
        """Keep `record` for `ttl` seconds (Redis expires it), at most `limit` conversations."""
        now = self._wall()

        async def call() -> None:
            await self._save_chat(keys=[self._k(f"chat:{cid}"), self._k("chat-index")],
                                  args=[json.dumps(record), max(int(ttl * 1000), 1), now, cid, limit,
                                        self._k("chat:")])
        await self._shared(call, lambda: self.local.save_conversation(cid, record, ttl, limit))

    # --- Token usage, failure windows, secrets ---------------------------------------------------------------

    async def add_usage(self, fingerprint: str, model: str, counts: Mapping[str, int]) -> None:
        """HINCRBY today's totals (one round trip)."""
        now = self._clock()
        key = self._k(f"usage:{now.date().isoformat()}")

        async def call() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for kind, tokens in counts.items():
                    pipe.hincrby(key, f"{fingerprint}|{kind}|{model}", tokens)
                pipe.expireat(key, int((next_midnight(now) + timedelta(days=1)).timestamp()))
                await pipe.execute()
        await self._shared(call, lambda: self.local.add_usage(fingerprint, model, counts))

    async def usage_today(self) -> dict[tuple[str, str], dict[str, int]]:
        """Today's totals of every instance."""
        key = self._k(f"usage:{self._clock().date().isoformat()}")

        async def call() -> dict[tuple[str, str], dict[str, int]]:
            totals: dict[tuple[str, str], dict[str, int]] = {}
            for field, value in (await self._hgetall(key)).items():
                fingerprint, _, rest = field.partition("|")
                kind, _, model = rest.partition("|")
                totals.setdefault((fingerprint, model), {}).update(counts_of({kind: int(value)}))
            return totals
        return await self._shared(call, self.local.usage_today)

    async def count_failure(self, name: str, who: str, window: float) -> int:
        """Count one failure in a window shared by every instance."""
        async def call() -> int:
            return int(await self._fail(keys=[self._k(f"fail:{name}:{who}")], args=[max(int(window * 1000), 1)]))
        return await self._shared(call, lambda: self.local.count_failure(name, who, window))

    async def failures(self, name: str, who: str) -> int:
        """Failures of `who` in its current window."""
        async def call() -> int:
            return int(await self._client.get(self._k(f"fail:{name}:{who}")) or 0)
        return await self._shared(call, lambda: self.local.failures(name, who))

    async def secret(self, name: str) -> str:
        """The secret every instance shares (made by the first to ask); remembered once read."""
        if name in self._secrets:
            return self._secrets[name]

        async def call() -> str:
            value = str(await self._secret(keys=[self._k(f"secret:{name}")], args=[self.local.secrets.get(name)]))
            self._secrets[name] = value
            return value
        return await self._shared(call, lambda: self.local.secret(name))
