"""Anonymous users' daily quotas: charged when a question goes upstream, given back by the refund rule."""
from __future__ import annotations

from typing import Any

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import QuotaExceeded
from chatgpt.domain.question import Question
from chatgpt.domain.quota import DailyQuota
from chatgpt.domain.runtime import RuntimeFlags


class Charge:
    """One question counted against one quota; `refund()` gives it back (at most once)."""

    def __init__(self, quota: DailyQuota, identity: str) -> None:
        self._quota: DailyQuota | None = quota
        self._identity = identity

    def refund(self) -> None:
        """Give the question back."""
        if self._quota is not None:
            self._quota.refund(self._identity)
            self._quota = None


class Accounts:
    """The daily quota (limit: runtime flag `demoLimit`) and the Baixing relay's own day limit (isDebug)."""

    def __init__(self, flags: RuntimeFlags, quota: DailyQuota, debug_quota: DailyQuota, meter: Meter) -> None:
        self._flags = flags
        self._quota = quota
        self._debug_quota = debug_quota
        self._meter = meter

    @property
    def debug(self) -> bool:
        """isDebug is on: anonymous and trusted chat goes to the Baixing relay under its own day limit."""
        return self._flags.debug

    def _current(self, debug: bool) -> DailyQuota:
        self._quota.limit = self._flags.demoLimit  # the operator may have changed it at runtime
        return self._debug_quota if debug else self._quota

    def charge(self, question: Question, *, debug: bool, free: bool) -> Charge | None:
        """Count an anonymous question (nothing for other payers, or when the answer costs nothing);
        raise QuotaExceeded when none is left today."""
        if question.payer.kind != "anonymous" or free:
            return None
        quota = self._current(debug)
        if not quota.take(question.identity):
            self._meter.quota_refused(question.entry)
            raise QuotaExceeded("today's questions are used up")
        return Charge(quota, question.identity)

    def remaining(self, identity: str) -> int:
        """Questions `identity` has left today: of the Baixing limit while isDebug is on (PROTOCOL.md E.1)."""
        return self._current(self._flags.debug).remaining(identity)

    def reset(self, identity: str | None) -> int:
        """Clear one identity's counters (both quotas), or everyone's; how many entries were cleared."""
        return self._quota.reset(identity) + self._debug_quota.reset(identity)

    def stores(self) -> dict[str, Any]:
        """The quotas as the state file keeps them (each has snapshot() and restore())."""
        return {"quota": self._quota, "debug_quota": self._debug_quota}
