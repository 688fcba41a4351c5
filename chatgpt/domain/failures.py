"""Failures per address in a sliding window (wrong admin tokens), kept in the store: with Redis, an
address meets the same limit on every instance."""
from __future__ import annotations

import time
from collections.abc import Callable

from chatgpt.domain.store import Store


class FailureLimit:
    """At most `max_failures` failures per key in any `window` seconds (the admin API's wrong tokens):
    past that the key is refused, even with the right answer, until its oldest failure leaves the window."""

    def __init__(self, store: Store, name: str, max_failures: int = 10, window: float = 60.0, *,
                 clock: Callable[[], float] = time.time) -> None:
        """Count failures called `name` in `store`; `clock` gives epoch seconds (shared by instances)."""
        self.store = store
        self.name = name
        self.max_failures = max_failures
        self.window = window
        self._clock = clock

    async def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again (0: it may now)."""
        now = self._clock()
        times = await self.store.recent_failures(self.name, key, now - self.window)
        if len(times) < self.max_failures:
            return 0.0
        return max(times[-self.max_failures] + self.window - now, 0.0)

    async def record(self, key: str) -> None:
        """Count one failure of `key`."""
        await self.store.add_failure(self.name, key, self._clock(), self.window, self.max_failures)
