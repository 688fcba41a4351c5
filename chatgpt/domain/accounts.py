"""Anonymous users' daily quotas: charged when a question goes upstream, given back by the refund rule.
The counters live in the store: with Redis, every instance charges the same count."""
from __future__ import annotations

import asyncio
import logging

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import Busy, QuotaExceeded
from chatgpt.domain.question import Question
from chatgpt.domain.quota import Quota
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.domain.store import StoreUnavailable

log = logging.getLogger(__name__)

BUSY_SECONDS = 5.0  # Retry-After while the shared quota cannot be checked (state.redis_fail: closed)


class Charge:
    """One question counted against one quota; `refund()` gives it back (at most once)."""

    def __init__(self, quota: Quota, identity: str) -> None:
        self._quota: Quota | None = quota
        self._identity = identity

    async def refund(self) -> None:
        """Give the question back. Shielded: it often runs while the question is being cancelled."""
        quota, self._quota = self._quota, None
        if quota is None:
            return
        try:
            await asyncio.shield(quota.refund(self._identity))
        except StoreUnavailable:
            log.warning("a refund was lost: the shared quota is unreachable")


class Accounts:
    """The daily quota (limit: runtime flag `demoLimit`) and the Baixing relay's own day limit (isDebug)."""

    def __init__(self, flags: RuntimeFlags, quota: Quota, debug_quota: Quota, meter: Meter) -> None:
        self._flags = flags
        self._quota = quota
        self._debug_quota = debug_quota
        self._meter = meter

    @property
    def debug(self) -> bool:
        """isDebug is on: anonymous and trusted chat goes to the Baixing relay under its own day limit."""
        return self._flags.debug

    def _current(self, debug: bool) -> Quota:
        self._quota.limit = self._flags.demoLimit  # the operator may have changed it at runtime
        return self._debug_quota if debug else self._quota

    async def charge(self, question: Question, *, debug: bool, free: bool) -> Charge | None:
        """Count an anonymous question against its account (the WeChat user, else the address; nothing for
        other payers, or when the answer costs nothing); raise QuotaExceeded when none is left today, Busy
        when the shared quota cannot be checked."""
        if question.payer.kind != "anonymous" or free:
            return None
        quota = self._current(debug)
        try:
            taken = await quota.take(question.account)
        except StoreUnavailable as exc:
            raise Busy(BUSY_SECONDS) from exc
        if not taken:
            self._meter.quota_refused(question.entry)
            raise QuotaExceeded("today's questions are used up")
        return Charge(quota, question.account)

    async def remaining(self, account: str) -> int:
        """Questions `account` (a `Question.account`) has left today: of the Baixing limit while isDebug is
        on (PROTOCOL.md E.1)."""
        try:
            return await self._current(self._flags.debug).remaining(account)
        except StoreUnavailable as exc:
            raise Busy(BUSY_SECONDS) from exc

    async def reset(self, identity: str | None) -> int:
        """Clear one identity's counters (both quotas), or everyone's; how many entries were cleared.
        StoreUnavailable when the shared quota cannot be reached (closed policy)."""
        return await self._quota.reset(identity) + await self._debug_quota.reset(identity)
