"""A clock the test moves by hand, for code that takes a `clock` callable (monotonic seconds or datetimes)."""
from __future__ import annotations

from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class FakeClock(Generic[T]):
    """Returns `now` when called; the test sets `now` itself. `FakeClock()` is monotonic seconds at 1000."""

    @overload
    def __init__(self: FakeClock[float]) -> None: ...
    @overload
    def __init__(self, now: T) -> None: ...
    def __init__(self, now: Any = 1000.0) -> None:
        self.now: T = now

    def __call__(self) -> T:
        return self.now
