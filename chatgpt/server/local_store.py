"""The in-process store: one instance's shared state in memory, snapshotted to the state file.

It also stands in for Redis while Redis is unreachable (`state.redis_fail: open`).
"""
from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from chatgpt.domain.memory import CONVERSATION_ID
from chatgpt.domain.quota import DailyQuota
from chatgpt.domain.store import FlagsWatcher, HealthWatcher, counts_of

MAX_FAILURE_ENTRIES = 10000  # addresses tracked by failure windows; a flood of them cannot grow memory
_SECRET_CHARS = frozenset("0123456789abcdef")


class LocalConversations:
    """`/chat` records by id, least recently saved first; snapshotted as {id: record}."""

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._items: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()  # id → (record, saved at)

    def __len__(self) -> int:
        return len(self._items)

    def load(self, cid: str) -> dict[str, Any] | None:
        """The record of `cid`, or None."""
        item = self._items.get(cid)
        return item[0] if item is not None else None

    def save(self, cid: str, record: dict[str, Any], ttl: float, limit: int) -> None:
        """Keep `record`; drop records unsaved for `ttl` seconds and the oldest past `limit`."""
        now = self._wall()
        self._items.pop(cid, None)
        self._items[cid] = (record, now)
        while self._items and next(iter(self._items.values()))[1] < now - ttl:
            self._items.popitem(last=False)
        while len(self._items) > limit:
            self._items.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """The records as kept in the state file."""
        return {cid: record for cid, (record, _) in self._items.items()}

    def restore(self, data: Any) -> None:
        """Take back saved records (ordered by their `used` time); malformed entries are skipped. The
        memory's rules (TTL, turns) apply when a record is read, its count bound at the next save."""
        if not isinstance(data, dict):
            return
        items = []
        for cid, record in data.items():
            if isinstance(cid, str) and CONVERSATION_ID.match(cid) and isinstance(record, dict):
                used = record.get("used")
                ok = isinstance(used, (int, float)) and not isinstance(used, bool) and math.isfinite(used)
                items.append((cid, record, float(used) if ok and isinstance(used, (int, float)) else 0.0))
        items.sort(key=lambda item: item[2])
        self._items = OrderedDict((cid, (record, used)) for cid, record, used in items)


class LocalUsage:
    """Today's token totals per (fingerprint, model); yesterday's are dropped at local midnight."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._day = clock().date().isoformat()
        self._totals: dict[tuple[str, str], dict[str, int]] = {}

    def _today(self) -> dict[tuple[str, str], dict[str, int]]:
        day = self._clock().date().isoformat()
        if day != self._day:
            self._day, self._totals = day, {}
        return self._totals

    def add(self, fingerprint: str, model: str, counts: Mapping[str, int]) -> None:
        """Add to today's totals."""
        totals = self._today().setdefault((fingerprint, model), {})
        for kind, tokens in counts.items():
            totals[kind] = totals.get(kind, 0) + tokens

    def today(self) -> dict[tuple[str, str], dict[str, int]]:
        """A copy of today's totals."""
        return {pair: dict(counts) for pair, counts in self._today().items()}

    def snapshot(self) -> dict[str, Any]:
        """Today's totals as JSON-safe data."""
        return {"day": self._day, "tokens": [[fp, model, counts] for (fp, model), counts in self._today().items()]}

    def restore(self, data: Any) -> None:
        """Take back today's totals; another day's (or malformed data) is ignored."""
        if not isinstance(data, dict) or data.get("day") != self._day or not isinstance(data.get("tokens"), list):
            return
        for row in data["tokens"]:
            if (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                    and isinstance(row[2], dict)):
                self.add(row[0], row[1], counts_of(row[2]))


class LocalSecrets:
    """Secrets by name, kept in the state file so tokens signed before a restart still verify."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, name: str) -> str:
        """The secret called `name`, made on first use."""
        if name not in self._values:
            self._values[name] = secrets.token_hex(32)
        return self._values[name]

    def snapshot(self) -> dict[str, str]:
        """Every secret (the state file is the operator's, like the settings file)."""
        return dict(self._values)

    def restore(self, data: Any) -> None:
        """Take back well-formed secrets (64 hex characters)."""
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(name, str) and isinstance(value, str) and len(value) == 64 and set(value) <= _SECRET_CHARS:
                    self._values[name] = value


class LocalStore:
    """`Store` in one process: no I/O, so every call returns at once."""

    shared = False

    def __init__(self, *, clock: Callable[[], datetime] = datetime.now, wall: Callable[[], float] = time.time) -> None:
        """`clock` gives local time (days), `wall` epoch seconds (TTLs, windows); both fakeable."""
        self._clock = clock
        self._wall = wall
        self._counters: dict[str, DailyQuota] = {}
        self.conversations = LocalConversations(wall)
        self.usage = LocalUsage(clock)
        self.secrets = LocalSecrets()
        # (name, who) → failure instants, least recently failed key first
        self.failure_log: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def counter(self, name: str) -> DailyQuota:
        """The day counter table called `name` (created on first use; a state file part)."""
        table = self._counters.get(name)
        if table is None:
            table = self._counters[name] = DailyQuota(0, clock=self._clock)
        return table

    async def take(self, counter: str, identity: str, limit: int) -> bool:
        """Count one if below `limit`."""
        return self.counter(counter).take(identity, limit)

    async def refund(self, counter: str, identity: str) -> None:
        """Give one back."""
        self.counter(counter).refund(identity)

    async def used(self, counter: str, identity: str) -> int:
        """Used today."""
        return self.counter(counter).used(identity)

    async def reset(self, counter: str, identity: str | None = None) -> int:
        """Clear one or all."""
        return self.counter(counter).reset(identity)

    async def publish_flags(self, changes: dict[str, Any]) -> None:
        """Nothing to do: the local flags are the only copy (the state file saves them)."""

    def watch_flags(self, apply: FlagsWatcher, current: Callable[[], dict[str, Any]]) -> None:
        """Nothing changes flags behind this process's back."""

    async def publish_key_health(self, fingerprint: str, health: dict[str, Any]) -> None:
        """Nothing to do: the key pool itself is the only copy."""

    def watch_key_health(self, apply: HealthWatcher) -> None:
        """Nothing changes key health behind this process's back."""

    async def load_conversation(self, cid: str) -> dict[str, Any] | None:
        """The record of `cid`, or None."""
        return self.conversations.load(cid)

    async def save_conversation(self, cid: str, record: dict[str, Any], ttl: float, limit: int) -> None:
        """Keep `record`."""
        self.conversations.save(cid, record, ttl, limit)

    async def add_usage(self, fingerprint: str, model: str, counts: Mapping[str, int]) -> None:
        """Add to today's totals."""
        self.usage.add(fingerprint, model, counts)

    async def usage_today(self) -> dict[tuple[str, str], dict[str, int]]:
        """Today's totals."""
        return self.usage.today()

    async def add_failure(self, name: str, who: str, at: float, window: float, keep: int) -> None:
        """Record a failure; the newest `keep` per key, at most MAX_FAILURE_ENTRIES keys."""
        times = self.failure_log.pop((name, who), None)
        if times is None or times.maxlen != keep:
            times = deque(times or (), maxlen=keep)
            while len(self.failure_log) >= MAX_FAILURE_ENTRIES:
                self.failure_log.popitem(last=False)  # a flood of addresses forgets the quietest first
        while times and times[0] <= at - window:
            times.popleft()
        times.append(at)
        self.failure_log[(name, who)] = times

    async def recent_failures(self, name: str, who: str, since: float) -> list[float]:
        """Failures after `since`, oldest first."""
        return [at for at in self.failure_log.get((name, who), ()) if at > since]

    async def secret(self, name: str) -> str:
        """The secret called `name`."""
        return self.secrets.get(name)
