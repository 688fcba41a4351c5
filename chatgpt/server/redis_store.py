"""The Redis store: the state several instances share (redis-py's asyncio client).

Counters are taken with a Lua script (check, count and EXPIREAT the next local midnight in one step);
`/chat` records expire by TTL and are bounded in count by a sorted index; usage is a hash per day;
failure instants are a sorted set per address; secrets one key each. The connection's health and the fallback are in
`redis_link.py`, the mirrored flags and key health in `redis_mirror.py`.
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from chatgpt.domain.store import counts_of, next_midnight
from chatgpt.server.local_store import LocalStore
from chatgpt.server.metrics import Metrics
from chatgpt.server.logs import redacted
from chatgpt.server.redis_link import POLL_SECONDS, as_text, json_object
from chatgpt.server.redis_mirror import RedisMirror

__all__ = ["RedisStore", "redacted"]

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
# KEYS[1] failure instants (a sorted set); ARGV: instant, a unique member, window s, how many to keep.
FAIL = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[3]))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[4]) - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
"""
# KEYS[1] secret; ARGV[1] a fresh random value, kept only if nobody made one before.
SECRET = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"""


class RedisStore(RedisMirror):
    """`Store` on Redis, with the in-process store as its fallback while Redis is unreachable."""

    shared = True

    def __init__(self, url: str, fail: str, local: LocalStore, *, prefix: str = "chatgpt:",
                 metrics: Metrics | None = None, clock: Callable[[], datetime] = datetime.now,
                 wall: Callable[[], float] = time.time, poll_seconds: float = POLL_SECONDS, timeout: float = 2.0) -> None:
        """Use Redis at `url`; `fail` is `open` (count locally while down) or `closed` (refuse)."""
        super().__init__(url, fail, local, prefix=prefix, metrics=metrics, poll_seconds=poll_seconds, timeout=timeout)
        self._clock = clock
        self._wall = wall
        self._take, self._refund = self._client.register_script(TAKE), self._client.register_script(REFUND)
        self._save_chat = self._client.register_script(SAVE_CONVERSATION)
        self._fail, self._secret = self._client.register_script(FAIL), self._client.register_script(SECRET)
        self._secrets: dict[str, str] = {}

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

    # --- `/chat` conversations -----------------------------------------------------------------------------

    async def load_conversation(self, cid: str) -> dict[str, Any] | None:
        """The record of `cid`, or None."""
        async def call() -> dict[str, Any] | None:
            text = await self._client.get(self._k(f"chat:{cid}"))
            return None if text is None else json_object(as_text(text))
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

    async def add_failure(self, name: str, who: str, at: float, window: float, keep: int) -> None:
        """Record a failure in a sorted set shared by every instance (expires with its window)."""
        async def call() -> None:
            await self._fail(keys=[self._k(f"fail:{name}:{who}")],
                             args=[at, f"{at!r}:{secrets.token_hex(4)}", window, keep])
        await self._shared(call, lambda: self.local.add_failure(name, who, at, window, keep))

    async def recent_failures(self, name: str, who: str, since: float) -> list[float]:
        """Failures of `who` after `since`, as every instance recorded them."""
        async def call() -> list[float]:
            found = await self._client.zrangebyscore(self._k(f"fail:{name}:{who}"), f"({since!r}", "+inf",
                                                     withscores=True)
            return [float(pair[1]) for pair in found]  # (member, score) pairs
        return await self._shared(call, lambda: self.local.recent_failures(name, who, since))

    async def secret(self, name: str) -> str:
        """The secret every instance shares (made by the first to ask); remembered once read."""
        if name in self._secrets:
            return self._secrets[name]

        async def call() -> str:
            value = str(await self._secret(keys=[self._k(f"secret:{name}")], args=[self.local.secrets.get(name)]))
            self._secrets[name] = value
            return value
        return await self._shared(call, lambda: self.local.secret(name))
