"""When the next text frame of a websocket answer may go out: the frame interval and a byte budget."""
from __future__ import annotations


class TextPace:
    """The spacing of one socket's text frames, reset for each answer.

    Every text frame carries the whole answer so far (PROTOCOL.md A.3), so at a fixed interval the
    bytes of an answer grow with the square of its length: 15 MB for 2,000 tokens at 30 tokens/s.
    Two rules space the frames of one answer instead:
    - at most one frame per `interval` seconds (the first at once): the client redraws no faster;
    - a byte budget, a token bucket per answer: it starts full at `burst` bytes and refills at
      `rate` bytes per second up to `burst`; a frame waits while the bucket is in debt. Whatever an
      answer of T seconds sends before its last frames is at most `burst + rate * T`: linear in
      its duration. A short answer spends less than `burst` and never waits for it.
    The answer's last text (something is queued behind it) waits for the interval only: waiting for
    the budget would save nothing, since it must be sent, and would hold the end frame up.
    `rate` 0 turns the budget off. Times are the caller's clock, in seconds: no clock is read here."""

    # One per websocket: slots keep its attributes without a dict (an idle socket costs ~20 KB in all).
    __slots__ = ("_credit", "_credit_at", "_sent_at", "burst", "interval", "rate")

    def __init__(self, interval: float, rate: float, burst: float) -> None:
        self.interval = interval
        self.rate = rate
        self.burst = burst
        self._sent_at = 0.0  # the last text frame of the answer being sent
        self._credit = 0.0  # bytes the answer may still send; below 0 it waits until refilled
        self._credit_at = 0.0

    def sent(self, now: float, size: int, first: bool) -> None:
        """Account a text frame of `size` bytes sent at `now`; `first`: the first of its answer."""
        if first:
            self._credit, self._credit_at = self.burst, now
        else:
            self._refill(now)
        self._credit -= size
        self._sent_at = now

    def interval_wait(self, now: float) -> float:
        """Seconds until the frame interval allows the answer's next text frame (0 or less: now)."""
        return self._sent_at + self.interval - now

    def budget_wait(self, now: float) -> float:
        """Seconds until the byte budget allows the answer's next text frame (0: now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return -self._credit / self.rate if self._credit < 0 else 0.0

    def _refill(self, now: float) -> None:
        self._credit = min(self.burst, self._credit + self.rate * (now - self._credit_at))
        self._credit_at = now
