"""Daily question quota per identity, reset at local midnight, with refunds and snapshots."""
from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from chatgpt.domain.store import Store


class DailyQuota:
    """Counts questions per identity for the current local day; `limit` may change at runtime."""

    def __init__(self, limit: int, *, clock: Callable[[], datetime] = datetime.now) -> None:
        """Allow `limit` questions per identity per day of `clock()` (local time by default)."""
        self.limit = limit
        self._clock = clock
        self._day: date = clock().date()
        # Only identities that used something are stored, so idle visitors cost nothing.
        self._used: dict[str, int] = {}

    def _today(self) -> date:
        """Return today's date, clearing every counter first if the day has changed."""
        today = self._clock().date()
        if today != self._day:
            self._day = today
            self._used = {}
        return today

    def used(self, identity: str) -> int:
        """How many questions `identity` has asked today."""
        self._today()
        return self._used.get(identity, 0)

    def remaining(self, identity: str) -> int:
        """How many questions `identity` may still ask today (never negative)."""
        self._today()
        return max(0, self.limit - self._used.get(identity, 0))

    def take(self, identity: str, limit: int | None = None) -> bool:
        """Count one question for `identity`; return False (counting nothing) if none are left."""
        self._today()
        used = self._used.get(identity, 0)
        # Compared against the current limit, so lowering demoLimit takes effect at once.
        if used >= (self.limit if limit is None else limit):
            return False
        self._used[identity] = used + 1
        return True

    def refund(self, identity: str) -> None:
        """Give one question back, e.g. when the upstream failed before producing any text."""
        self._today()
        used = self._used.get(identity, 0)
        # After a midnight reset the counter is gone, so a late refund cannot go below zero.
        if used <= 1:
            self._used.pop(identity, None)
        else:
            self._used[identity] = used - 1

    def reset(self, identity: str | None = None) -> int:
        """Clear one identity's counter, or all of them; return how many entries were cleared."""
        self._today()
        if identity is None:
            cleared = len(self._used)
            self._used = {}
            return cleared
        return 1 if self._used.pop(identity, None) is not None else 0

    def __len__(self) -> int:
        """Number of identities with questions counted today."""
        self._today()
        return len(self._used)

    def snapshot(self) -> dict[str, Any]:
        """Return today's counters as JSON-safe data: {"day": "YYYY-MM-DD", "used": {id: n}}."""
        today = self._today()
        return {"day": today.isoformat(), "used": dict(self._used)}

    def restore(self, data: Any) -> None:
        """Load counters from `snapshot()` data; malformed data or another day's is ignored."""
        today = self._today()
        if not isinstance(data, dict) or data.get("day") != today.isoformat():
            # Yesterday's counts would have been reset at midnight anyway.
            return
        used = data.get("used")
        if not isinstance(used, dict):
            return
        self._used = {
            identity: count
            for identity, count in used.items()
            # bool is an int subclass; true/false in a hand-edited file is not a count.
            if isinstance(identity, str) and type(count) is int and count > 0
        }


class Quota:
    """A named daily quota (the rule the pipeline calls); its counters live in the store, so with
    Redis every instance counts against the same number."""

    def __init__(self, store: Store, counter: str, limit: int) -> None:
        """Count under `counter` in `store`, allowing `limit` per identity per day (changeable)."""
        self.store = store
        self.counter = counter
        self.limit = limit

    async def take(self, identity: str) -> bool:
        """Count one question; False (nothing counted) when the day's questions are used up."""
        return await self.store.take(self.counter, identity, self.limit)

    async def refund(self, identity: str) -> None:
        """Give one question back (the upstream produced nothing)."""
        await self.store.refund(self.counter, identity)

    async def remaining(self, identity: str) -> int:
        """Questions `identity` may still ask today (never negative)."""
        return max(0, self.limit - await self.store.used(self.counter, identity))

    async def reset(self, identity: str | None = None) -> int:
        """Clear one identity's counter, or everyone's; how many were cleared."""
        return await self.store.reset(self.counter, identity)
