"""What sharing the state through Redis costs a question (issue 17).

    python bench/redis_state.py [--questions 400]

(Not bench/redis.py: Python puts bench/ first on sys.path, and that name would hide the redis package.)

The same server, without and with `state.redis_url`, answers anonymous questions one after another
(`/v1/chat/completions` and `/chat`) from a fast fake upstream: the time per question, and the Redis
round trips per question (the commands the server sends, seen with MONITOR; commands run inside
a Lua script are one round trip with their script), apart from the background polling measured
while idle. Then a second instance joins and runtime flags are changed on one: how long until the
other serves them. Needs `redis-server` (Debian: apt-get install redis-server). One JSON line per
measurement on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import emit, percentile, r  # noqa: E402
from procs import PY, REPO, Bench, free_port, log  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-0001"
IDLE_SECONDS = 10.0
COUNTED = 50  # questions per path whose Redis commands are counted


def settings(bench: Bench, port: int, redis_url: str | None) -> Path:
    """The bench's project settings, plus an admin token and, when given, the Redis URL."""
    path = bench.project_settings(port)
    text = path.read_text().replace("state:\n", "admin:\n  token: " + ADMIN_TOKEN + "\nstate:\n")
    if redis_url:
        text = text.replace("state:\n", f"state:\n  redis_url: {redis_url}\n")
    path.write_text(text)
    return path


def start(bench: Bench, redis_url: str | None) -> str:
    """One project process (pinned to core 0); its base URL."""
    port = free_port()
    proc = bench.spawn("project", [PY, str(REPO / "app.py"), "--config", str(settings(bench, port, redis_url)),
                                   "--port", str(port)], 0)
    bench.wait_ready(proc, port)
    return f"http://127.0.0.1:{port}"


async def questions(bases: list[str], path: str, count: int) -> list[list[float]]:
    """Seconds per question for each server: `count` anonymous questions one after another, taking
    turns between the servers (so a busy machine slows both alike), on kept-alive connections."""
    body: dict[str, Any] = ({"messages": [{"role": "user", "content": "hello"}]} if path.startswith("/v1")
                            else {"content": "hello"})
    took: list[list[float]] = [[] for _ in bases]
    async with aiohttp.ClientSession() as http:
        for n in range(count + 20):
            for base, times in zip(bases, took):
                started = time.perf_counter()
                async with http.post(base + path, json=body) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{path} answered {response.status}")
                if n >= 20:  # the first ones warm up connections and caches
                    times.append(time.perf_counter() - started)
    return took


class Monitor:
    """Counts the commands clients send (not those a Lua script runs) while it listens."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.counts: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        ready = asyncio.Event()

        async def listen() -> None:
            async with self.client.monitor() as monitor:
                ready.set()
                async for info in monitor.listen():
                    if info.get("client_type") != "lua":
                        name = str(info["command"]).split()[0].lower()
                        self.counts[name] = self.counts.get(name, 0) + 1
        self._task = asyncio.create_task(listen())
        await ready.wait()
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.1)  # the last commands reach the monitor
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


def timing(took: list[float]) -> dict[str, Any]:
    return {"p10_ms": r((percentile(took, 10) or 0) * 1000), "median_ms": r(statistics.median(took) * 1000), "p90_ms": r((percentile(took, 90) or 0) * 1000),
            "mean_ms": r(statistics.fmean(took) * 1000)}


async def measure(bench: Bench, redis_url: str, count: int) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        local, shared = start(bench, None), start(bench, redis_url)
        async with Monitor(client) as idle:
            await asyncio.sleep(IDLE_SECONDS)
        per_second = {name: calls / IDLE_SECONDS for name, calls in idle.counts.items()}
        for path in ("/v1/chat/completions", "/chat"):
            plain, took = await questions([local, shared], path, count)  # timed without MONITOR (it slows Redis)
            started = time.perf_counter()
            async with Monitor(client) as seen:
                await questions([shared], path, COUNTED)
            seconds = time.perf_counter() - started
            # The polling of flags and key health runs whatever the traffic: taken out, counted apart.
            per_question = {name: r(max(calls - per_second.get(name, 0) * seconds, 0) / (COUNTED + 20), 2)
                            for name, calls in seen.counts.items()}
            emit({"measure": "per_question", "path": path, "questions": count,
                  "without_redis": timing(plain), "with_redis": timing(took),
                  "added_median_ms": r((statistics.median(took) - statistics.median(plain)) * 1000),
                  "added_p10_ms": r(((percentile(took, 10) or 0) - (percentile(plain, 10) or 0)) * 1000),
                  "redis_round_trips_per_question": {k: v for k, v in per_question.items() if v}})
        emit({"measure": "background", "redis_commands_per_second_per_instance": {k: r(v, 2) for k, v in per_second.items()}})
        await flag_spread(bench, shared, redis_url)
    finally:
        await client.aclose()


async def flag_spread(bench: Bench, first: str, redis_url: str, changes: int = 20) -> None:
    """Milliseconds from a PATCH on one instance until the other serves the new announcement."""
    second = start(bench, redis_url)
    took = []
    async with aiohttp.ClientSession() as http:
        for n in range(changes):
            text = f"bench {n} {time.time()}"
            started = time.perf_counter()
            async with http.patch(f"{first}/admin/runtime", json={"announcement": text},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
                if response.status != 200:
                    raise RuntimeError(f"PATCH answered {response.status}")
            while True:
                async with http.get(f"{second}//announcement") as response:
                    if (await response.json()).get("content") == text:
                        break
                await asyncio.sleep(0.005)
            took.append(time.perf_counter() - started)
    emit({"measure": "flag_spread", "changes": changes, **timing(took), "max_ms": r(max(took) * 1000)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=400, help="questions per path and server")
    args = parser.parse_args()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        log("redis-server is not installed: apt-get install redis-server")
        return 2
    bench = Bench(quick=False)
    try:
        bench.start_upstream()
        port = free_port()
        folder = bench.tmp / "redis"
        folder.mkdir()
        bench.spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                              "--save", "", "--appendonly", "no"], 1)
        time.sleep(0.3)
        log(f"redis-server on {port}; {args.questions} questions per path, without then with Redis")
        asyncio.run(measure(bench, f"redis://127.0.0.1:{port}/0", args.questions))
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
