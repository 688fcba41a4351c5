"""Send-time stamps in answer tokens, and a small histogram for latency samples.

The capacity benchmark's upstream (bench/paced_upstream.py) ends every content token with a
stamp: the system-wide monotonic clock (CLOCK_MONOTONIC, the same in every process of the
machine) in units of 0.1 ms, modulo 10^6, as 6 digits. A client that receives text can thus tell
how long ago the newest token it holds left the upstream, whatever the server in between did to
it (relayed, re-framed, accumulated into a websocket frame).

The words in front of the stamps carry some Markdown (paragraphs, a list, bold, inline code, a
code fence, Chinese) so the project's renderer does real work; none of them contains a digit,
and no word ends where 6 trailing digits would change its Markdown meaning (a fence line ends
with its newline, so the stamp starts the next line). A token is ~11 characters on average
(the issue's benchmark had ~9).
"""
from __future__ import annotations

import json
import math
import time

STAMP_DIGITS = 6
STAMP_UNIT_NS = 100_000  # 0.1 ms
STAMP_MODULO = 1_000_000  # 10**STAMP_DIGITS; the stamp wraps every 100 s: far longer than any delay measured

WORDS: tuple[str, ...] = (
    "Here", " is", " a", " **short**", " answer", " to", " the", " question.", " It", " has",
    " a", " few", " parts:", "\n\n- one", " point", "\n- two", " of", " them", "\n\n你好", "，世界。",
    " Some", " `code`", " in", " a", " line,", " and", " a", " block:", "\n\n```python\n", "print(\"hi\")",
    "\n```\n\n", "So", " it", " is", " done", " now.", " We", " go", " on", "\n\n",
)
# The words as they appear inside a JSON string (escaped once, not per token).
WORDS_JSON: tuple[bytes, ...] = tuple(json.dumps(w, ensure_ascii=False)[1:-1].encode() for w in WORDS)


def stamp_at(ns: int) -> bytes:
    """The stamp for monotonic time `ns` (nanoseconds)."""
    return b"%06d" % ((ns // STAMP_UNIT_NS) % STAMP_MODULO)


def age_ms(stamp: int, at_ns: int) -> float:
    """Milliseconds from a stamp to the monotonic time `at_ns` (0.1 ms resolution)."""
    return ((at_ns // STAMP_UNIT_NS - stamp) % STAMP_MODULO) / 10


def now_ns() -> int:
    """The clock the stamps use."""
    return time.monotonic_ns()


class Histogram:
    """Millisecond samples in fixed buckets: 0.1 ms wide below 100 ms, 1 ms wide up to 20 s.

    Recording is one list increment, so the load generator can record every frame without
    keeping hundreds of thousands of floats; percentiles are the bucket's upper edge."""

    FINE = 1000  # buckets of 0.1 ms for 0..100 ms
    COARSE = 19_900  # buckets of 1 ms for 100 ms..20 s

    def __init__(self) -> None:
        self.counts = [0] * (self.FINE + self.COARSE + 1)
        self.n = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        """Record one sample (negative samples count as 0)."""
        if ms < 100.0:
            index = int(ms * 10) if ms > 0 else 0
        else:
            index = min(self.FINE + int(ms - 100.0), self.FINE + self.COARSE)
        self.counts[index] += 1
        self.n += 1
        if ms > self.max:
            self.max = ms

    def merge(self, other: Histogram) -> None:
        """Add another histogram's samples to this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.n += other.n
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile `p` (0..100) in ms, as the bucket's upper edge; None when empty."""
        if not self.n:
            return None
        rank = max(1, min(self.n, math.ceil(p / 100 * self.n)))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                if index < self.FINE:
                    edge = (index + 1) / 10
                elif index < self.FINE + self.COARSE:
                    edge = 100.0 + (index - self.FINE + 1)
                else:
                    edge = self.max
                return min(edge, self.max)
        return self.max
