"""Load generators for the benchmark: /v1 SSE clients and mini-program websockets.

Prints one JSON object on stdout when done (progress goes to stderr). Modes:

    load.py v1   --url BASE [--concurrency 64] [--warmup 2 --duration 10 | --count N]
    load.py ws   --url BASE [--sockets 64]     [--warmup 2 --duration 10 | --count N]
    load.py ttft --targets raw=BASE,project=BASE [--count 300] [--kind v1|ws]
    load.py hold --url BASE --sockets 2000 [--steps 2]  (idle sockets; a line per step, then waits)

`--watch name=PID,...` adds the CPU seconds each process used during the measured window.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_seconds, host_steal, percentile, r, raise_nofile, run_on_bench_loop  # noqa: E402

V1_BODY = json.dumps({"model": "gpt-3.5-turbo", "stream": True,
                      "messages": [{"role": "user", "content": "Say something."}]}).encode()
V1_HEADERS = {"Content-Type": "application/json"}  # no Authorization: anonymous, the server's pool pays
TOKEN = re.compile(rb'"content":\s*"[^"]')  # a chunk or frame with text in it (not the empty role chunk)
DONE_MARK = ('"isDone":true', '"isDone": true')
FAILED_MARK = ('"isSuccess":false', '"isSuccess": false')


def question_frame(n: int) -> str:
    """The mini-program's chat question (tests/test_ws.py `question()`): anonymous, one user item."""
    prompt = "Say something."
    return json.dumps({
        "conversationId": f"c-{n}", "id": f"u-{n}", "parentId": 1, "authType": "api", "authValue": "Bearer ",
        "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
        "messages": [{"role": "user", "content": prompt, "html": f"<p>{prompt}</p>", "isSend": True,
                      "createTime": "2026-11-24 08:00:00", "id": f"u-{n}"}],
    }, ensure_ascii=False)


def log(*args: Any) -> None:
    print("  [load]", *args, file=sys.stderr, flush=True)


@dataclass
class Tally:
    """What the clients saw in the measured window."""

    answers: int = 0
    errors: int = 0
    bytes: int = 0
    frames: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    error_sample: str | None = None

    def error(self, text: str) -> None:
        self.errors += 1
        if self.error_sample is None:
            self.error_sample = text[:300]


class Window:
    """The measured window: answers count only when they end inside it."""

    def __init__(self, watch: dict[str, int]) -> None:
        self.watch = watch
        self.open = False
        self.closed = False
        self.started = self.ended = 0.0
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def begin(self) -> None:
        self.steal0 = host_steal()
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.watch.items()}
        self.cpu0["load"] = time.process_time()
        self.started = time.perf_counter()
        self.open = True

    def end(self) -> None:
        self.ended = time.perf_counter()
        self.open, self.closed = False, True
        now = {name: cpu_seconds(pid) for name, pid in self.watch.items()}
        now["load"] = time.process_time()
        self.cpu = {name: now[name] - self.cpu0[name] for name in now}
        steal, all_ = (b - a for a, b in zip(self.steal0, host_steal(), strict=True))
        self.steal_pct = 100 * steal / all_ if all_ else 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def report(self) -> dict[str, Any]:
        return {"window_s": r(self.seconds), "cpu_s": {k: r(v, 4) for k, v in self.cpu.items()},
                "cpu_pct": {k: r(100 * v / self.seconds, 1) for k, v in self.cpu.items()},
                "steal_pct": r(self.steal_pct, 1)}


def summarize(t: Tally, window: Window) -> dict[str, Any]:
    n = max(t.answers, 1)
    out = {"answers": t.answers, "answers_per_s": r(t.answers / window.seconds, 1), "errors": t.errors,
           "ttft_ms_p50": r(ms(percentile(t.ttft, 50))), "ttft_ms_p99": r(ms(percentile(t.ttft, 99))),
           "latency_ms_p50": r(ms(percentile(t.latency, 50))), "latency_ms_p99": r(ms(percentile(t.latency, 99))),
           "bytes_per_answer": r(t.bytes / n, 1), "frames_per_answer": r(t.frames / n, 2)}
    if t.error_sample:
        out["error_sample"] = t.error_sample
    out.update(window.report())
    return out


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# ---------------------------------------------------------------- /v1 SSE

async def v1_request(session: aiohttp.ClientSession, url: str) -> tuple[float | None, float, int, int, str | None]:
    """One streamed completion: (ttft s, total s, bytes, data lines, error text or None)."""
    started = time.perf_counter()
    ttft = None
    size = 0
    head = b""
    tail = b""
    lines = 0
    async with session.post(url, data=V1_BODY, headers=V1_HEADERS) as response:
        if response.status != 200:
            return None, time.perf_counter() - started, 0, 0, f"HTTP {response.status}: {(await response.text())[:200]}"
        async for chunk in response.content.iter_any():
            size += len(chunk)
            lines += chunk.count(b"data: ")
            if ttft is None:
                head += chunk
                if TOKEN.search(head):
                    ttft = time.perf_counter() - started
                    head = b""
            tail = (tail + chunk)[-64:]
    total = time.perf_counter() - started
    if not tail.endswith(b"data: [DONE]\n\n"):
        return ttft, total, size, lines, f"stream did not end with [DONE]: {tail!r}"
    if ttft is None:
        return None, total, size, lines, "no token in the answer"
    return ttft, total, size, lines, None


async def v1_worker(session: aiohttp.ClientSession, url: str, window: Window, t: Tally, stop: asyncio.Event,
                    quota: list[int]) -> None:
    while not stop.is_set():
        if quota[0] == 0:
            return
        quota[0] -= 1
        try:
            ttft, total, size, lines, error = await v1_request(session, url)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ttft, total, size, lines, error = None, 0.0, 0, 0, f"{type(exc).__name__}: {exc}"
        if not window.open:
            continue
        if error:
            t.error(error)
            continue
        t.answers += 1
        t.bytes += size
        t.frames += lines
        t.ttft.append(ttft)
        t.latency.append(total)


# ---------------------------------------------------------------- websocket

async def ws_question(ws: aiohttp.ClientWebSocketResponse, n: int,
                      timeout: float = 120.0) -> tuple[float | None, float, int, int, str | None]:
    """Ask one question and read up to its isDone frame: (ttft s, total s, bytes, frames, error)."""
    started = time.perf_counter()
    await ws.send_str(question_frame(n))
    ttft = None
    size = frames = 0
    while True:
        message = await ws.receive(timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            return ttft, time.perf_counter() - started, size, frames, f"socket ended: {message.type.name}"
        data = message.data
        frames += 1
        size += len(data.encode())
        if ttft is None and TOKEN.search(data.encode()):
            ttft = time.perf_counter() - started
        if DONE_MARK[0] in data or DONE_MARK[1] in data:
            total = time.perf_counter() - started
            if FAILED_MARK[0] in data or FAILED_MARK[1] in data:
                return ttft, total, size, frames, f"error frame: {data[:200]}"
            return ttft, total, size, frames, None


async def connect_all(session: aiohttp.ClientSession, url: str, count: int,
                      parallel: int = 64) -> list[aiohttp.ClientWebSocketResponse]:
    """Open `count` sockets, `parallel` handshakes at a time."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            sockets.append(await session.ws_connect(url, max_msg_size=0, autoping=True, heartbeat=None))

    await asyncio.gather(*(one() for _ in range(count)))
    return sockets


async def ws_worker(ws: aiohttp.ClientWebSocketResponse, window: Window, t: Tally, stop: asyncio.Event,
                    quota: list[int], base: int) -> None:
    n = base
    while not stop.is_set():
        if quota[0] == 0:
            return
        quota[0] -= 1
        n += 1
        try:
            ttft, total, size, frames, error = await ws_question(ws, n)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ttft, total, size, frames, error = None, 0.0, 0, 0, f"{type(exc).__name__}: {exc}"
        if not window.open:
            if error and ws.closed:
                return
            continue
        if error:
            t.error(error)
            if ws.closed:
                return
            continue
        t.answers += 1
        t.bytes += size
        t.frames += frames
        if ttft is not None:
            t.ttft.append(ttft)
        t.latency.append(total)


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


async def run_load(args: argparse.Namespace, watch: dict[str, int]) -> dict[str, Any]:
    """v1 or ws: N clients, either for warmup+duration seconds or for a fixed count of answers."""
    window, tally, stop = Window(watch), Tally(), asyncio.Event()
    fixed = args.count is not None
    quota = [args.count if fixed else -1]
    async with make_session() as session:
        if args.mode == "v1":
            url = args.url + args.path
            workers = [v1_worker(session, url, window, tally, stop, quota) for _ in range(args.concurrency)]
            clients = args.concurrency
            sockets: list[aiohttp.ClientWebSocketResponse] = []
        else:
            sockets = await connect_all(session, args.url + args.path, args.sockets)
            log(f"{len(sockets)} sockets open")
            workers = [ws_worker(ws, window, tally, stop, quota, i * 1_000_000) for i, ws in enumerate(sockets)]
            clients = args.sockets
        tasks = [asyncio.ensure_future(w) for w in workers]
        try:
            if fixed:
                window.begin()
                await asyncio.gather(*tasks)
                window.end()
            else:
                await asyncio.sleep(args.warmup)
                window.begin()
                await asyncio.sleep(args.duration)
                window.end()
                stop.set()
                await asyncio.wait(tasks, timeout=30)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    out = {"mode": args.mode, "clients": clients}
    out.update(summarize(tally, window))
    return out


# ---------------------------------------------------------------- sequential TTFT

async def run_ttft(args: argparse.Namespace) -> dict[str, Any]:
    """One request at a time, alternating between targets, so drift hits all of them alike."""
    targets = dict(item.split("=", 1) for item in args.targets.split(","))
    results: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "total": []} for name in targets}
    errors: dict[str, int] = {name: 0 for name in targets}
    samples: dict[str, str] = {}
    async with make_session() as session:
        sockets = {}
        if args.kind == "ws":
            for name, base in targets.items():
                sockets[name] = await session.ws_connect(base + args.path, max_msg_size=0)
        for i in range(args.warmup_count + args.count):
            for name, base in targets.items():
                try:
                    if args.kind == "v1":
                        ttft, total, _, _, error = await v1_request(session, base + args.path)
                    else:
                        ttft, total, _, _, error = await ws_question(sockets[name], i)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    ttft, total, error = None, 0.0, f"{type(exc).__name__}: {exc}"
                if i < args.warmup_count:
                    continue
                if error or ttft is None:
                    errors[name] += 1
                    samples.setdefault(name, error or "no token")
                    continue
                results[name]["ttft"].append(ttft)
                results[name]["total"].append(total)
        for ws in sockets.values():
            await ws.close()
    out: dict[str, Any] = {"mode": "ttft", "kind": args.kind, "count": args.count}
    for name, res in results.items():
        out[name] = {"ttft_ms_p50": r(ms(percentile(res["ttft"], 50))),
                     "ttft_ms_p99": r(ms(percentile(res["ttft"], 99))),
                     "total_ms_p50": r(ms(percentile(res["total"], 50))),
                     "n": len(res["ttft"]), "errors": errors[name]}
        if name in samples:
            out[name]["error_sample"] = samples[name][:300]
    return out


# ---------------------------------------------------------------- idle sockets

async def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    """Open --sockets sockets in --steps equal steps; after each step check that every new socket
    answers a heartbeat, print one JSON line and wait for a line on stdin; then close them all."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    ping = json.dumps({"heart": "ping"})
    async with make_session() as session:
        for step in range(args.steps):
            started = time.perf_counter()
            new = await connect_all(session, args.url + args.path, args.sockets // args.steps)
            await asyncio.gather(*(ws.send_str(ping) for ws in new))
            answers = await asyncio.gather(*(ws.receive(30) for ws in new), return_exceptions=True)
            ok = sum(1 for a in answers if isinstance(a, aiohttp.WSMessage) and a.type == aiohttp.WSMsgType.TEXT)
            sockets += new
            print(json.dumps({"step": step + 1, "open": len(sockets), "heartbeat_ok": ok,
                              "connect_s": r(time.perf_counter() - started)}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"mode": "hold", "closed": len(sockets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("v1", "ws", "ttft", "hold"))
    parser.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:9200")
    parser.add_argument("--path", help="default: /v1/chat/completions (v1), //websocket (ws, hold)")
    parser.add_argument("--targets", help="ttft: name=BASE,name=BASE")
    parser.add_argument("--kind", choices=("v1", "ws"), default="v1", help="ttft: which protocol")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sockets", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--count", type=int, help="a fixed number of answers instead of a duration")
    parser.add_argument("--steps", type=int, default=1, help="hold: open the sockets in this many steps")
    parser.add_argument("--warmup-count", type=int, default=20, help="ttft: requests per target not measured")
    parser.add_argument("--watch", default="", help="name=PID,... processes whose CPU time to report")
    args = parser.parse_args()
    if args.path is None:
        kind = args.kind if args.mode == "ttft" else args.mode
        args.path = "/v1/chat/completions" if kind == "v1" else "//websocket"
    if args.mode == "ttft" and args.count is None:
        args.count = 300
    watch = {name: int(pid) for name, pid in (item.split("=") for item in args.watch.split(",") if item)}
    raise_nofile()
    if args.mode in ("v1", "ws"):
        result = run_on_bench_loop(run_load(args, watch))
    elif args.mode == "ttft":
        result = run_on_bench_loop(run_ttft(args))
    else:
        result = run_on_bench_loop(run_hold(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
