"""Who may ask now: maintenance first, then the per-IP limit of the door a request came through."""
from __future__ import annotations

from collections.abc import Mapping

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import Maintenance, RateLimited
from chatgpt.domain.limits import LimiterTable
from chatgpt.domain.runtime import RuntimeFlags


class Gate:
    """Maintenance (runtime flag `status`) and one limiter table per door (`ws`, `v1`, `chat`, `http`)."""

    def __init__(self, flags: RuntimeFlags, limits: Mapping[str, LimiterTable], meter: Meter) -> None:
        self._flags = flags
        self._limits = dict(limits)
        self._meter = meter

    @property
    def serving(self) -> bool:
        """False while the operator has the server in maintenance."""
        return self._flags.serving

    async def admit(self, door: str, identity: str) -> None:
        """A question at `door`: refused during maintenance, then when `identity` is over the door's rate."""
        if not self._flags.serving:
            raise Maintenance("the server is in maintenance")
        await self.limit(door, identity)

    async def limit(self, door: str, identity: str) -> None:
        """Any other request at `door`: refused when `identity` is over the door's rate."""
        table = self._limits.get(door)
        if table is not None and not await table.allow(identity):
            self._meter.limit_refused(door)
            raise RateLimited(door, table.retry_after(identity))

    def table(self, door: str) -> LimiterTable:
        """The limiter table of `door` (operations and tests look at its size)."""
        return self._limits[door]
