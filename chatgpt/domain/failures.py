"""Failures per address in a fixed window (wrong admin tokens), counted in the store: with Redis, an
address meets the same limit on every instance."""
from __future__ import annotations

from chatgpt.domain.store import Store


class FailureLimit:
    """At most `limit` failures per address per `window` seconds; past it the address is refused."""

    def __init__(self, store: Store, name: str, limit: int, window: float) -> None:
        """Count failures called `name` in `store`."""
        self.store = store
        self.name = name
        self.limit = limit
        self.window = window

    async def blocked(self, who: str) -> bool:
        """True while `who` has used up its failures of the current window."""
        return await self.store.failures(self.name, who) >= self.limit

    async def fail(self, who: str) -> None:
        """Count one failure of `who`."""
        await self.store.count_failure(self.name, who, self.window)
