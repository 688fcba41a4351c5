"""An event loop whose clock a test moves forward, for rules about time that live on the loop's clock
(aiolimiter drains its buckets by `loop.time()`). Moving it is like waiting that long, without the wait:
timers due by then fire at once. A test module opts in with `EVENT_LOOP = "warp"` (tests/conftest.py)."""
from __future__ import annotations

import asyncio



class WarpLoop(asyncio.SelectorEventLoop):
    """A selector loop whose `time()` is the real monotonic clock plus what the test has skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0.0

    def time(self) -> float:
        return super().time() + self.skipped


def skip(seconds: float) -> None:
    """Move the running loop's clock forward, as if `seconds` had passed."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, WarpLoop), 'the test module needs EVENT_LOOP = "warp" (see tests/conftest.py)'
    loop.skipped += seconds
