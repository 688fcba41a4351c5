"""Per-key (per-IP) rate limiters on aiolimiter, bounded in memory by idle eviction and a size cap.
(The sliding-window limit on wrong admin tokens is in failures.py: it is kept in the store.)"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from aiolimiter import AsyncLimiter


class _Entry:
    """One key's limiter and when it was last used (by the table's clock)."""

    __slots__ = ("limiter", "last_used")

    def __init__(self, limiter: AsyncLimiter, last_used: float) -> None:
        """Hold a limiter and its last-use time."""
        self.limiter = limiter
        self.last_used = last_used


class LimiterTable:
    """Lazily created `AsyncLimiter`s, one per key, kept in least-recently-used order."""

    def __init__(
        self,
        max_rate: float,
        time_period: float,
        *,
        max_entries: int = 10000,
        idle_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Allow `max_rate` requests per `time_period` seconds per key, at most `max_entries` keys."""
        if not max_rate > 0 or not time_period > 0:
            raise ValueError("max_rate and time_period must be positive")
        if max_entries < 1 or idle_seconds < 0:
            raise ValueError("max_entries must be at least 1 and idle_seconds not negative")
        if max_rate < 1:
            # AsyncLimiter refuses to acquire more than max_rate at once, so a rate such as
            # 0.5/s becomes 1 per 2 s: the same average, with a burst of one.
            time_period /= max_rate
            max_rate = 1.0
        self.max_rate = float(max_rate)
        self.time_period = float(time_period)
        self.max_entries = max_entries
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        """Number of keys currently tracked."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Tell whether a key currently has a limiter."""
        return key in self._entries

    async def allow(self, key: str) -> bool:
        """Count one request for `key` and return True, or return False when over the rate."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            self._make_room()
            # Created here, inside the running loop: AsyncLimiter binds to the loop on first use.
            entry = _Entry(AsyncLimiter(self.max_rate, self.time_period), now)
            self._entries[key] = entry
        else:
            self._entries.move_to_end(key)
            entry.last_used = now
        if not entry.limiter.has_capacity():
            return False
        # With capacity available acquire() returns without yielding, so no other task can
        # take the capacity between the check and the acquisition.
        await entry.limiter.acquire()
        return True

    def retry_after(self, key: str) -> float:
        """Seconds until one more request for `key` would be allowed (0 if it would be now)."""
        entry = self._entries.get(key)
        if entry is None or entry.limiter.has_capacity():
            return 0.0
        # A full bucket drains one request's worth in time_period / max_rate seconds; an upper
        # bound, so a client honouring Retry-After is never refused again for waiting too little.
        return self.time_period / self.max_rate

    def evict_idle(self) -> int:
        """Drop keys unused for longer than `idle_seconds`; return how many were removed."""
        cutoff = self._clock() - self.idle_seconds
        removed = 0
        # Entries are in last-use order, so the idle ones are all at the front.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.last_used >= cutoff:
                break
            del self._entries[key]
            removed += 1
        return removed

    def _make_room(self) -> None:
        """Free a slot for a new key: idle ones first, then the least recently used."""
        self.evict_idle()
        while len(self._entries) >= self.max_entries:
            # Under a flood of distinct keys this forgets the quietest clients first; their
            # buckets have drained the most, so forgetting them lets the least through.
            self._entries.popitem(last=False)

