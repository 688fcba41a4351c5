"""Runtime flags and key health through Redis: each instance keeps its own copy (read on every request),
a change is written to a hash with a version key and announced on a pub/sub channel; every instance
pulls at once on the notice, and polls the versions every `POLL_SECONDS` in case a notice was lost.
Flags missing from Redis (a fresh or emptied one) are written back from this instance's values.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from chatgpt.domain.store import FlagsWatcher, HealthWatcher
from chatgpt.server.redis_link import UNREACHABLE, RedisLink, json_object, as_text

log = logging.getLogger(__name__)


class RedisMirror(RedisLink):
    """The mirrored part of the Redis store (flags, key health)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As `RedisLink`."""
        super().__init__(*args, **kwargs)
        self._flag_watchers: list[tuple[FlagsWatcher, Callable[[], dict[str, Any]]]] = []
        self._health_watchers: list[HealthWatcher] = []
        self._versions: dict[str, str | None] = {}  # version key → value last pulled (absent: pull)
        self._pending_flags: dict[str, Any] = {}  # changed here while Redis was down
        self._pending_health: dict[str, dict[str, Any]] = {}

    async def _resume(self) -> None:
        if self._pending_flags:
            await self._push_flags()
        for fingerprint in list(self._pending_health):
            await self._push_health(fingerprint)

    def _forget(self) -> None:
        self._versions.clear()

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
        flags_v, keys_v = [None if v is None else as_text(v)
                           for v in await self._client.mget(self._k("flags:v"), self._k("keys:v"))]
        if self._flag_watchers and ("flags" not in self._versions or self._versions["flags"] != flags_v):
            await self._pull_flags(flags_v)
        if self._health_watchers and ("keys" not in self._versions or self._versions["keys"] != keys_v):
            raw = await self._hgetall(self._k("keys"))
            records = {fp: record for fp, text in raw.items() if (record := json_object(text)) is not None}
            for apply_health in self._health_watchers:
                apply_health(records)
            self._versions["keys"] = keys_v

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

