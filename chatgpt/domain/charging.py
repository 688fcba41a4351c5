"""A question's charge and its accounting however it ends: the refund rule (PROTOCOL.md E.1), the
outcome its metrics and log line say."""
from __future__ import annotations

import asyncio
from types import TracebackType

from chatgpt.domain.accounting import Meter, QuestionRecord
from chatgpt.domain.accounts import Accounts, Charge
from chatgpt.domain.errors import AnswerBlocked, ContentRefused, QuotaExceeded, Refused, UpstreamFailed
from chatgpt.domain.question import Question
from chatgpt.domain.upstreams import Progress, Route


def outcome_of(exc: BaseException) -> str:
    """A short outcome label for metrics and the question log line."""
    if isinstance(exc, QuotaExceeded):
        return "quota"
    if isinstance(exc, (ContentRefused, AnswerBlocked)):
        return "content"
    if isinstance(exc, UpstreamFailed):
        return "upstream_error"
    if isinstance(exc, Refused):
        return "refused"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "client_left"
    return "error"


def refundable(exc: BaseException, progress: Progress) -> bool:
    """PROTOCOL.md E.1: given back only when the upstream was never asked, or gave nothing of an answer
    before it failed. A client that leaves after the request went upstream is charged: the operator
    is billed either way."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return not progress.asked
    return not progress.produced


class Accounted:
    """`async with Accounted(...) as progress:` charges the question on the way in; on the way out,
    however the block ends, the record's outcome is set, the refund rule applied and the record
    finished (metrics, log line). A class rather than an `@asynccontextmanager`: it is entered once per
    question, and a generator-based one costs an async generator and its machinery each time."""

    __slots__ = ("_accounts", "_meter", "_question", "_route", "record", "progress", "_charge")

    def __init__(self, accounts: Accounts, meter: Meter, question: Question, route: Route,
                 record: QuestionRecord) -> None:
        self._accounts = accounts
        self._meter = meter
        self._question = question
        self._route = route
        self.record = record
        self.progress = Progress()
        self._charge: Charge | None = None

    async def __aenter__(self) -> Progress:
        try:
            self._charge = await self._accounts.charge(self._question, debug=self._route.debug, free=self._route.free)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self.progress

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        try:
            if exc is not None:
                self.record.outcome = outcome_of(exc)
                if self._charge is not None and refundable(exc, self.progress):
                    await self._charge.refund()
        finally:
            self._meter.finish(self.record)
