"""Helpers shared by the benchmark processes: /proc readings, percentiles, the answer text."""
from __future__ import annotations

import asyncio
import json
import math
import os
import resource
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The answer the fake upstream streams, one token per item, cycled: Markdown with paragraphs,
# bold, a list, a code fence and some Chinese, so the project's renderer does real work.
TOKENS: tuple[str, ...] = (
    "Here", " is", " a", " **short**", " answer", " about", " the", " question", ".", " It",
    " has", " several", " parts", ":", "\n\n", "- first", " point", "\n", "- second", " point",
    "\n\n", "你好", "，", "世界", "。", " Some", " `code`", " inline", ".", "\n\n",
    "```python", "\n", "print", "(", "\"hi\"", ")", "\n", "```", "\n\n", "Done", ".", "\n\n",
)


def token_text(n: int) -> list[str]:
    """The first `n` tokens of the cycled answer."""
    return [TOKENS[i % len(TOKENS)] for i in range(n)]


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (2,000 sockets need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """CPU time used by process `pid` so far (all threads).

    Uses /proc/<pid>/task/*/schedstat (nanoseconds) when present, else utime+stime of
    /proc/<pid>/stat (clock ticks, usually 10 ms)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def host_steal() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs from /proc/stat: time the hypervisor gave elsewhere."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def rss_kb(pid: int) -> int:
    """Resident size (VmRSS) of `pid` in KB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def bench_loop() -> asyncio.AbstractEventLoop:
    """The event loop of the benchmark's own processes (the fake upstream, the load): uvloop when
    installed. They share one core; on asyncio's loop they saturate it before the raw relay saturates
    its own, and the relay's figure is then the load side's, not the relay's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_on_bench_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on `bench_loop()`."""
    with asyncio.Runner(loop_factory=bench_loop) as runner:
        return runner.run(main)


def r(value: float | None, digits: int = 3) -> float | None:
    """Round for the JSON output."""
    return None if value is None else round(value, digits)


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout."""
    print(json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")), flush=True)
