"""Capacity benchmark: how many concurrent paced answers one core carries, per path, vs a bare relay.

    python bench/capacity.py                      # default ladder, the long answer too (6-10 min)
    python bench/capacity.py --quick              # 4 rungs per path, no long answer (~3 min)
    python bench/capacity.py --nice -10           # on a machine busy with other work (needs root)
    python bench/capacity.py --only-long          # only the 2,000-token websocket answer (~75 s)
    python bench/capacity.py --ladder 100,200 --paths v1,ws --measure 20

A paced fake upstream (bench/paced_upstream.py) streams `--tokens` tokens at `--rate` tokens/s,
each stamped with its send time. Closed-loop clients (bench/capacity_load.py) ask again as soon
as their answer ends. The server under test runs pinned to core 0 (`taskset -c 0`); the upstream
and this process (the load) run on core 1. Paths:

- `raw-v1`: the bare aiohttp relay (bench/raw_relay.py), `/v1/chat/completions` streamed: the
  reference every ratio is against;
- `v1`: the project (`python app.py`), `/v1/chat/completions` streamed, anonymous caller;
- `ws`: the project's `//websocket`, the mini-program's demo-mode question (PROTOCOL.md A.3);
- `raw-ws` (not by default): the bare relay's websocket, a frame per upstream chunk.

The project's settings (bench/procs.py) raise the rate limits and the daily quota so nothing is
refused, and each client sends its own X-Forwarded-For address. Each path has its own server
process. The paths climb the ladder interleaved: at each rung each path in turn (the order
rotating), so a machine whose other load drifts hurts them alike. A rung starts its clients
spread over one answer's duration (so their tokens do not arrive in lock-step), waits a
settling pause, measures one window and stops the clients. Per rung one JSON line on stdout:
server CPU (% of one core, /proc/<pid>/task/*/schedstat) and RSS, answers/s, added delay per
piece (receive time minus the send stamp of the newest token in it: a /v1 network read, a
websocket frame) p50/p99, time to first token p50/p99, errors, bytes and frames per answer,
server CPU per answer and per token; and the load side's health: this process's and the
upstream's CPU, core 1's and core 0's busy time (all processes, from /proc/stat), this process's
event-loop lag and the upstream's lateness against its schedule. A rung whose load side looks
saturated carries warnings: its delays may be the load's, not the server's.

A rung holds when its p99 added delay is ≤ `--limit-ms` (100), it has no errors, and its time
to first token p99 is within `--limit-ms` of the lowest rung's (the unloaded value); a path's
capacity is the top of the rungs that hold, climbing from the lowest. The summary gives it with the ratio to `raw-v1`, server CPU per answer below the knee (×raw),
and time to first token p99 at the lowest rung and at capacity. A path stops climbing after two
failing rungs in a row or one far past its knee (p99 over 10× the limit, or many errors) unless
`--full-ladder`. When the bare relay passes even the top rung, its capacity is only a lower
bound (the load side, on one core, costs about what the bare relay does per token).

The long answer (`--long`, on by default except with --quick): one websocket question of
`--long-tokens` (2,000) tokens at `--rate`, alone: bytes and frames received, the last text
frame's size, gaps between frames (all, and over the first 300 tokens), server CPU.
Progress and the tables go to stderr; stdout has only JSON lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from capacity_load import LagMonitor, Recorder, client_loop, one_ws_answer  # noqa: E402
from common import cpu_seconds, emit, percentile, r, raise_nofile, rss_kb  # noqa: E402
from procs import PY, Bench, Proc, free_port, log  # noqa: E402

HOST = "127.0.0.1"
PATHS: dict[str, tuple[str, str, str]] = {  # name: (server, client kind, URL path)
    "raw-v1": ("raw", "v1", "/v1/chat/completions"),
    "v1": ("project", "v1", "/v1/chat/completions"),
    "ws": ("project", "ws", "//websocket"),
    "raw-ws": ("raw", "ws", "//websocket"),
}
REFERENCE = "raw-v1"
# Up to 1,500: the bare relay carries ~1,200 paced answers on one core here, about what the load
# core can drive, so its knee needs the top rungs (the project paths stop earlier, past their knees).
FULL_LADDER = "50,100,200,300,400,500,600,800,1000,1200,1500"
QUICK_LADDER = "100,200,400,800"
# The load side counts as saturated past these (its delays are then partly its own).
LOAD_CPU_PCT = 85.0  # load generator + upstream, of core 1
LOAD_LAG_MS = 20.0  # p99 lateness of the load's event loop: it adds straight to the delays measured
UPSTREAM_LATE_MS = 20.0  # p99 lateness of the upstream's writes: the server then gets fewer tokens
CORE_OTHERS_PCT = 15.0  # other processes on either core (the machine may be shared)


# ---------------------------------------------------------------- /proc readings

def core_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks since boot, from /proc/stat (busy: all but idle, iowait, steal)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(values)
            out[int(name[3:])] = (total - values[3] - values[4] - values[7], total)
    return out


@dataclass
class Snapshot:
    """CPU counters at one instant."""

    at: float
    server: float
    upstream: float
    load: float
    cores: dict[int, tuple[int, int]]

    @classmethod
    def take(cls, server: int, upstream: int) -> Snapshot:
        return cls(time.monotonic(), cpu_seconds(server), cpu_seconds(upstream), cpu_seconds(os.getpid()),
                   core_ticks())


def core_busy_pct(a: Snapshot, b: Snapshot, core: int) -> float | None:
    if core not in a.cores or core not in b.cores:
        return None
    busy = b.cores[core][0] - a.cores[core][0]
    total = b.cores[core][1] - a.cores[core][1]
    return 100 * busy / total if total else None


# ---------------------------------------------------------------- the fake upstream's control routes

async def http_json(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A small HTTP/1.1 request to the fake upstream (one connection, closed after the answer)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            raw = await reader.read()
        finally:
            writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise RuntimeError(f"{method} {path}: {head[:100]!r}")
    return json.loads(rest)


class Context:
    """Everything one run shares: options, processes, the upstream's port."""

    def __init__(self, args: argparse.Namespace, bench: Bench) -> None:
        self.args = args
        self.bench = bench
        self.upstream_port = 0
        self.upstream: Proc | None = None

    @property
    def upstream_pid(self) -> int:
        assert self.upstream is not None
        return self.upstream.pid

    async def start_upstream(self) -> None:
        """The paced upstream on core 1; ready when its stats route answers."""
        self.upstream_port = free_port()
        argv = [PY, str(BENCH / "paced_upstream.py"), "--port", str(self.upstream_port),
                "--tokens", str(self.args.tokens), "--rate", str(self.args.rate)]
        self.upstream = self.bench.spawn("paced_upstream", argv, 1)
        renice(self.upstream.pid, self.args.nice)
        self.bench.upstream_base = f"http://{HOST}:{self.upstream_port}/v1"
        deadline = time.monotonic() + 20
        while True:
            try:
                await http_json(self.upstream_port, "GET", "/bench/stats")
                return
            except (OSError, RuntimeError, TimeoutError):
                if not self.upstream.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the paced upstream did not start: {self.upstream.tail()}") from None
                await asyncio.sleep(0.05)

    async def configure(self, tokens: int, rate: float) -> None:
        await http_json(self.upstream_port, "POST", "/bench/config", {"tokens": tokens, "rate": rate})

    async def upstream_stats(self, reset: bool) -> dict[str, Any]:
        stats: dict[str, Any] = await http_json(self.upstream_port, "GET",
                                                "/bench/stats?reset=1" if reset else "/bench/stats")
        return stats

    async def start_server(self, which: str) -> tuple[Proc, str]:
        """The bare relay or the project, pinned to core 0, once it answers //status."""
        start = self.bench.start_raw if which == "raw" else self.bench.start_project
        proc, base = await asyncio.to_thread(start)
        renice(proc.pid, self.args.nice)
        return proc, base


def renice(pid: int, nice: int) -> None:
    """Give a benchmark process the `--nice` priority (a shared machine: other work then yields)."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as exc:
            log(f"could not set nice {nice} on pid {pid} ({exc}); running at the default priority")


def set_session_nice(nice: int | None) -> int | None:
    """Set this session's autogroup nice; returns the previous value (None when there is none).

    With the kernel's autogroup scheduling (sched_autogroup_enabled), a process's nice only ranks
    it within its session; between sessions the session's autogroup nice counts. Every benchmark
    process is in this process's session, so `--nice` sets that too, and it is put back after."""
    group = Path("/proc/self/autogroup")
    if nice is None or not group.exists():
        return None
    try:
        previous = int(group.read_text().split()[-1])  # "/autogroup-3 nice 0"
        group.write_text(str(nice))
        return previous
    except (OSError, ValueError) as exc:
        log(f"could not set the session's autogroup nice to {nice} ({exc})")
        return None


# ---------------------------------------------------------------- one path up the ladder

@dataclass
class PathState:
    """One path's server and how its climb goes."""

    name: str
    proc: Proc
    port: int
    failed: int = 0  # rungs failed in a row
    done: bool = False  # past its knee: no higher rungs


async def climb_all(ctx: Context, lag: LagMonitor) -> list[dict[str, Any]]:
    """Every path up the ladder, interleaved: at each rung each path in turn (the order rotating),
    so the paths are measured minutes apart at most and a machine whose other load drifts
    hurts them alike. Each path has its own server process; only one is loaded at a time."""
    args = ctx.args
    states: list[PathState] = []
    rows: list[dict[str, Any]] = []
    try:
        for name in args.paths:
            proc, base = await ctx.start_server(PATHS[name][0])
            states.append(PathState(name, proc, int(base.rsplit(":", 1)[1])))
        for step, clients in enumerate(args.ladder):
            for state in states[step % len(states):] + states[:step % len(states)]:
                if state.done:
                    continue
                row = await rung(ctx, state, clients, lag)
                emit(row)
                rows.append(row)
                state.failed = state.failed + 1 if not row["passes"] else 0
                p99 = row["delay_ms_p99"]
                if not args.full_ladder and (state.failed >= 2 or (p99 is not None and p99 > 10 * args.limit_ms)
                                             or row["errors"] > max(10, row["answers"] // 5)):
                    log(f"{state.name}: past its knee at {clients} clients; skipping its higher rungs")
                    state.done = True
    finally:
        await asyncio.gather(*(asyncio.to_thread(ctx.bench.stop, state.proc) for state in states))
    order = {name: i for i, name in enumerate(args.paths)}
    return sorted(rows, key=lambda row: (order[row["path"]], row["clients"]))


async def rung(ctx: Context, state: PathState, clients: int, lag: LagMonitor) -> dict[str, Any]:
    """Start `clients` closed-loop clients spread over the ramp, settle, measure, stop them."""
    args = ctx.args
    _, kind, url_path = PATHS[state.name]
    recorder = Recorder()
    stop = asyncio.Event()
    answer_s = args.tokens / args.rate if args.rate > 0 else 1.0
    log(f"{state.name}: {clients} clients (started over {args.ramp:.1f} s, settle {args.settle:.0f} s, "
        f"measure {args.measure:.0f} s)")
    tasks = [asyncio.create_task(client_loop(kind, n, HOST, state.port, url_path, recorder, args.ramp * n / clients,
                                             answer_timeout=max(60.0, 4 * answer_s), stop=stop))
             for n in range(clients)]
    try:
        await asyncio.sleep(args.ramp + args.settle)
        row = await measure(ctx, state.name, clients, state.proc, recorder, lag)
        if not state.proc.alive():
            raise RuntimeError(f"{state.name}: the server died: {state.proc.tail()}")
        return row
    finally:
        recorder.on = False
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure(ctx: Context, name: str, clients: int, proc: Proc, recorder: Recorder,
                  lag: LagMonitor) -> dict[str, Any]:
    """One measured window at the current number of clients."""
    args = ctx.args
    await ctx.upstream_stats(reset=True)
    errors_before = recorder.errors_any
    recorder.reset()
    lag.lag = type(lag.lag)()
    before = Snapshot.take(proc.pid, ctx.upstream_pid)
    recorder.on = True
    rss: list[int] = []
    end = before.at + args.measure
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(1.0, left))
        rss.append(rss_kb(proc.pid))
    recorder.on = False
    after = Snapshot.take(proc.pid, ctx.upstream_pid)
    upstream = await ctx.upstream_stats(reset=True)
    seconds = after.at - before.at
    server_cpu = after.server - before.server
    tokens = upstream["tokens"]
    answers = recorder.answers
    row: dict[str, Any] = {
        "path": name, "clients": clients, "window_s": r(seconds, 1),
        "server_cpu_pct": r(100 * server_cpu / seconds, 1), "rss_mb": r(max(rss) / 1024, 1),
        "answers": answers, "answers_per_s": r(answers / seconds, 1),
        "delay_ms_p50": r(recorder.delay.percentile(50), 1), "delay_ms_p99": r(recorder.delay.percentile(99), 1),
        "delay_ms_max": r(recorder.delay.max, 1), "pieces": recorder.delay.n,
        "ttft_ms_p50": r(percentile(recorder.ttft, 50), 1), "ttft_ms_p99": r(percentile(recorder.ttft, 99), 1),
        "errors": recorder.errors,
        "bytes_per_answer": r(recorder.bytes / answers, 0) if answers else None,
        "frames_per_answer": r(recorder.frames / answers, 1) if answers else None,
        "tokens_per_s": r(tokens / seconds, 0),
        # per answer's worth of tokens streamed in the window: steadier than per answer ended in it
        "server_ms_per_answer": r(1000 * server_cpu * args.tokens / tokens, 2) if tokens else None,
        "server_us_per_token": r(1e6 * server_cpu / tokens, 1) if tokens else None,
        "load_cpu_pct": r(100 * (after.load - before.load) / seconds, 1),
        "upstream_cpu_pct": r(100 * (after.upstream - before.upstream) / seconds, 1),
        "core1_busy_pct": r(core_busy_pct(before, after, 1), 1),
        "core0_busy_pct": r(core_busy_pct(before, after, 0), 1),
        "load_lag_ms_p99": r(lag.lag.percentile(99), 1), "load_lag_ms_max": r(lag.lag.max, 1),
        "upstream_late_ms_p99": upstream["late_ms_p99"],
    }
    core0 = row["core0_busy_pct"]
    row["core0_others_pct"] = r(max(0.0, core0 - row["server_cpu_pct"]), 1) if core0 is not None else None
    if recorder.error_sample:
        row["error_sample"] = recorder.error_sample
    if recorder.errors_any - errors_before > recorder.errors:
        row["errors_before_window"] = recorder.errors_any - errors_before - recorder.errors
    row["passes"] = bool(row["delay_ms_p99"] is not None and row["delay_ms_p99"] <= args.limit_ms
                         and recorder.errors == 0 and answers > 0)
    row["warnings"] = warnings_of(row)
    row["saturated"] = any(w.startswith("load side") for w in row["warnings"])
    for warning in row["warnings"]:
        log(f"  WARNING {name} @ {clients}: {warning}")
    return row


def warnings_of(row: dict[str, Any]) -> list[str]:
    """Why a rung's figures may not be the server's alone."""
    out = []
    own = (row["load_cpu_pct"] or 0.0) + (row["upstream_cpu_pct"] or 0.0)
    lag, late = row["load_lag_ms_p99"], row["upstream_late_ms_p99"]
    core1, others = row["core1_busy_pct"], row["core0_others_pct"]
    if own >= LOAD_CPU_PCT:
        out.append(f"load side saturated: load {row['load_cpu_pct']}% + upstream {row['upstream_cpu_pct']}% "
                   f"of core 1")
    if lag is not None and lag >= LOAD_LAG_MS:
        out.append(f"load side saturated: its event loop lags {lag:.0f} ms at p99 (adds to the delays measured)")
    if late is not None and late >= UPSTREAM_LATE_MS:
        out.append(f"load side saturated: the upstream writes {late:.0f} ms late at p99 (fewer tokens than asked)")
    if core1 is not None and core1 - own >= CORE_OTHERS_PCT:
        out.append(f"load core shared: other processes used {core1 - own:.0f}% of core 1")
    if others is not None and others >= CORE_OTHERS_PCT:
        out.append(f"server core shared: other processes used {others:.0f}% of core 0")
    return out


# ---------------------------------------------------------------- the long answer

async def long_answer(ctx: Context) -> dict[str, Any]:
    """One long websocket answer, alone: what it costs the user in bytes and frames."""
    args = ctx.args
    tokens, rate = args.long_tokens, args.rate
    await ctx.configure(tokens, rate)
    proc, base = await ctx.start_server("project")
    try:
        port = int(base.rsplit(":", 1)[1])
        cpu0 = cpu_seconds(proc.pid)
        log(f"long answer: one websocket question, {tokens} tokens at {rate:g} tokens/s "
            f"(~{tokens / rate:.0f} s)")
        res = await one_ws_answer(HOST, port, "//websocket", timeout=3 * tokens / rate + 60)
        cpu = cpu_seconds(proc.pid) - cpu0
        rss = rss_kb(proc.pid)
    finally:
        await asyncio.to_thread(ctx.bench.stop, proc)
        await ctx.configure(args.tokens, args.rate)
    trace: list[tuple[int, int]] = res["trace"]
    times = [t for t, _ in trace]
    gaps = [(b - a) / 1e6 for a, b in zip(times, times[1:])]
    early_end = res["started_ns"] + int(300 / rate * 1e9)  # the first 300 tokens' worth of time
    early = [(b - a) / 1e6 for a, b in zip(times, times[1:]) if b <= early_end]
    total = sum(size for _, size in trace)
    last_text = trace[-2][1] if len(trace) >= 2 else 0  # the last frame is the done frame
    out: dict[str, Any] = {
        "mode": "long_answer", "path": "ws", "tokens": tokens, "tokens_per_s": rate, "error": res["error"],
        "bytes": total, "mb": r(total / 1e6, 2), "frames": len(trace),
        "seconds": r((times[-1] - res["started_ns"]) / 1e9, 1) if times else None,
        "last_text_frame_bytes": last_text, "bytes_over_last_frame": r(total / last_text, 1) if last_text else None,
        "gap_ms_p50": r(percentile(gaps, 50), 1), "gap_ms_p99": r(percentile(gaps, 99), 1),
        "gap_ms_max": r(max(gaps), 1) if gaps else None,
        "first_300_tokens_gap_ms_max": r(max(early), 1) if early else None,
        "delay_ms_p50": r(res["delay"].percentile(50), 1), "delay_ms_p99": r(res["delay"].percentile(99), 1),
        "server_cpu_ms": r(1000 * cpu, 0), "server_rss_mb": r(rss / 1024, 1),
    }
    return out


# ---------------------------------------------------------------- summary

def summarize(rows: list[dict[str, Any]], limit_ms: float) -> dict[str, Any]:
    """Capacity per path and how it compares with the bare relay."""
    paths: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(row["path"] for row in rows):
        mine = sorted((row for row in rows if row["path"] == name), key=lambda row: row["clients"])
        # A rung holds when it passes and its time to first token p99 stays within limit_ms of the
        # lowest rung's (issue 16: "within 100 ms of its unloaded value"). The capacity is the top of
        # the rungs that hold from the bottom up: a path that fails a rung has met its knee there,
        # even if a higher rung happens to pass.
        unloaded = mine[0]["ttft_ms_p99"] if mine else None
        top = None
        for row in mine:
            ttft = row["ttft_ms_p99"]
            if not row["passes"] or (unloaded is not None and (ttft is None or ttft > unloaded + limit_ms)):
                break
            top = row
        passing = [row for row in mine if row["passes"]]
        below = [row for row in passing if top is not None and row["clients"] <= top["clients"]]
        paths[name] = {
            "capacity": top["clients"] if top else 0,
            # it passed every rung it climbed: the knee is higher than the ladder (or the load) reaches
            "capacity_is_lower_bound": top is not None and top is mine[-1],
            "answers_per_s_at_capacity": top["answers_per_s"] if top else None,
            "ttft_ms_p99_lowest_rung": mine[0]["ttft_ms_p99"],
            "ttft_ms_p99_at_capacity": top["ttft_ms_p99"] if top else None,
            "delay_ms_p99_at_capacity": top["delay_ms_p99"] if top else None,
            "server_ms_per_answer": _mean([row["server_ms_per_answer"] for row in below]),
            "server_us_per_token": _mean([row["server_us_per_token"] for row in below]),
            "bytes_per_answer": _mean([row["bytes_per_answer"] for row in below]),
            "saturated_rungs": [row["clients"] for row in mine if row["saturated"]],
            "passing_rungs_above_capacity": [row["clients"] for row in passing
                                             if top is None or row["clients"] > top["clients"]],
        }
    ref = paths.get(REFERENCE)
    for name, item in paths.items():
        if ref and ref["capacity"]:
            item["vs_bare_relay"] = r(item["capacity"] / ref["capacity"], 2)
            # against a lower bound the ratio is an upper bound (and the other way round)
            low_ref, low_mine = ref["capacity_is_lower_bound"], item["capacity_is_lower_bound"]
            item["vs_bare_relay_bound"] = ("" if name == REFERENCE else "unknown" if low_ref and low_mine
                                           else "at most" if low_ref else "at least" if low_mine else "")
        if ref and ref["server_ms_per_answer"] and item["server_ms_per_answer"]:
            item["cpu_per_answer_vs_bare_relay"] = r(item["server_ms_per_answer"] / ref["server_ms_per_answer"], 2)
    return {"mode": "summary", "limit_ms_p99": limit_ms, "reference": REFERENCE, "paths": paths}


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return r(statistics.fmean(present), 2) if present else None


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{suffix}" if abs(value) < 100 else f"{value:,.0f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_tables(rows: list[dict[str, Any]], summary: dict[str, Any] | None, long: dict[str, Any] | None) -> None:
    """Human-readable tables on stderr."""
    out: list[str] = []
    if rows:
        out.append("")
        out.append(f"{'path':7} {'clients':>7} {'cpu%':>6} {'rss MB':>7} {'ans/s':>6} {'delay p50':>9} "
                   f"{'p99 ms':>7} {'ttft p99':>8} {'err':>4} {'µs/tok':>7} {'KB/ans':>7} {'load%':>6} "
                   f"{'core1%':>6} {'lag p99':>7} {'core0 others%':>13}  ok")
        for row in rows:
            kb = row["bytes_per_answer"] / 1024 if row["bytes_per_answer"] else None
            flag = ("yes" if row["passes"] else "no") + (" SATURATED" if row["saturated"] else "")
            out.append(f"{row['path']:7} {row['clients']:>7} {_fmt(row['server_cpu_pct']):>6} "
                       f"{_fmt(row['rss_mb']):>7} {_fmt(row['answers_per_s']):>6} {_fmt(row['delay_ms_p50']):>9} "
                       f"{_fmt(row['delay_ms_p99']):>7} {_fmt(row['ttft_ms_p99']):>8} {row['errors']:>4} "
                       f"{_fmt(row['server_us_per_token']):>7} {_fmt(kb):>7} {_fmt(row['load_cpu_pct']):>6} "
                       f"{_fmt(row['core1_busy_pct']):>6} {_fmt(row['load_lag_ms_p99']):>7} "
                       f"{_fmt(row['core0_others_pct']):>13}  {flag}")
    if summary:
        out.append("")
        out.append(f"capacity = top of the rungs that hold from the lowest up: p99 added delay <= "
                   f"{summary['limit_ms_p99']:g} ms, no errors, and ttft p99 within {summary['limit_ms_p99']:g} ms "
                   f"of the lowest rung's")
        out.append(f"{'path':7} {'capacity':>8} {'vs bare relay':>13} {'CPU/answer ms':>13} {'(x bare)':>8} "
                   f"{'µs/token':>8} {'ttft p99 lowest -> at capacity':>31} {'KB/answer':>9}  load saturated at")
        for name, item in summary["paths"].items():
            kb = item["bytes_per_answer"] / 1024 if item["bytes_per_answer"] else None
            ttft = f"{_fmt(item['ttft_ms_p99_lowest_rung'])} -> {_fmt(item['ttft_ms_p99_at_capacity'])} ms"
            capacity = (">=" if item["capacity_is_lower_bound"] else "") + str(item["capacity"])
            bound = {"at most": "<=", "at least": ">=", "unknown": "?"}.get(item.get("vs_bare_relay_bound", ""), "")
            ratio = bound + _ratio(item.get("vs_bare_relay"))
            out.append(f"{name:7} {capacity:>8} {ratio:>13} "
                       f"{_fmt(item['server_ms_per_answer']):>13} {_ratio(item.get('cpu_per_answer_vs_bare_relay')):>8} "
                       f"{_fmt(item['server_us_per_token']):>8} {ttft:>31} {_fmt(kb):>9}  "
                       f"{','.join(map(str, item['saturated_rungs'])) or '-'}")
    if long:
        out.append("")
        out.append(f"long answer over the websocket: {long['tokens']:,} tokens at {long['tokens_per_s']:g}/s -> "
                   f"{long['bytes']:,} bytes ({long['mb']} MB) in {long['frames']:,} frames, last text frame "
                   f"{long['last_text_frame_bytes']:,} bytes (total = {long['bytes_over_last_frame']}x it); "
                   f"frame gaps p50 {long['gap_ms_p50']} / p99 {long['gap_ms_p99']} / max {long['gap_ms_max']} ms "
                   f"(first 300 tokens: max {long['first_300_tokens_gap_ms_max']} ms); server CPU "
                   f"{long['server_cpu_ms']:,.0f} ms" + (f"; ERROR {long['error']}" if long["error"] else ""))
    print("\n".join(out), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- main

async def run(ctx: Context) -> int:
    args = ctx.args
    lag = LagMonitor()
    lag.start()
    rows: list[dict[str, Any]] = []
    summary = long = None
    try:
        await ctx.start_upstream()
        if not args.only_long:
            rows = await climb_all(ctx, lag)
            summary = summarize(rows, args.limit_ms)
            emit(summary)
        if args.long:
            long = await long_answer(ctx)
            emit(long)
    finally:
        lag.stop()
        print_tables(rows, summary, long)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"ladder {QUICK_LADDER}, shorter windows, no long answer")
    parser.add_argument("--ladder", help=f"concurrent clients per rung (default {FULL_LADDER})")
    parser.add_argument("--paths", default="raw-v1,v1,ws", help=f"comma-separated, of {','.join(PATHS)}")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--rate", type=float, default=30.0, help="tokens per second per answer")
    parser.add_argument("--limit-ms", type=float, default=100.0, help="p99 added delay a passing rung stays within")
    parser.add_argument("--ramp", type=float, help="seconds over which a rung's new clients start "
                        "(default: one answer's duration; --quick 4)")
    parser.add_argument("--settle", type=float, help="seconds between the ramp and the window (default 2)")
    parser.add_argument("--measure", type=float, help="seconds measured per rung (default 12; --quick 8)")
    parser.add_argument("--full-ladder", action="store_true", help="climb every rung even far past the knee")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the project's server.event_loop (auto: uvloop when installed); the bare relay always "
                             "runs on asyncio's own loop")
    parser.add_argument("--stream-interval-ms", type=int, help="the project's server.stream_interval_ms "
                        "(default: the project's own default, 50; 0: a write per upstream read)")
    parser.add_argument("--nice", type=int, default=0, help="run the server, upstream and load at this nice "
                        "value, e.g. -10 on a machine busy with other work (needs the privilege)")
    long = parser.add_mutually_exclusive_group()
    long.add_argument("--long", dest="long", action="store_true", default=None,
                      help="measure the long websocket answer (default unless --quick)")
    long.add_argument("--no-long", dest="long", action="store_false")
    parser.add_argument("--only-long", action="store_true", help="only the long answer")
    parser.add_argument("--long-tokens", type=int, default=2000, help="tokens of the long answer")
    args = parser.parse_args()
    args.ladder = sorted({int(n) for n in (args.ladder or (QUICK_LADDER if args.quick else FULL_LADDER)).split(",")})
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; known: {', '.join(PATHS)}")
    answer_s = args.tokens / args.rate if args.rate > 0 else 1.0
    if args.ramp is None:
        args.ramp = 4.0 if args.quick else answer_s
    if args.settle is None:
        args.settle = 2.0
    if args.measure is None:
        args.measure = 8.0 if args.quick else 12.0
    if args.ramp + args.settle + args.measure <= answer_s:
        parser.error(f"--ramp + --settle + --measure must exceed one answer's {answer_s:.1f} s, or no "
                     "answer ends in the window")
    if args.long is None:
        args.long = not args.quick
    if args.only_long:
        args.long = True
    return args


def main() -> int:
    args = parse_args()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_nofile()
    bench = Bench(args.quick)
    bench.event_loop = args.event_loop
    bench.stream_interval_ms = args.stream_interval_ms
    if bench.pinned:
        os.sched_setaffinity(0, {1})  # the load shares core 1 with the upstream, never the server's core
    else:
        log("fewer than 2 cores or no taskset: running UNPINNED, figures are not comparable")
    rungs = 0 if args.only_long else len(args.ladder) * len(args.paths)
    estimate = rungs * (args.ramp + args.settle + args.measure) + (args.long_tokens / args.rate + 5 if args.long else 0)
    log(f"capacity: paths {','.join(args.paths)}, ladder {args.ladder}, {args.tokens} tokens at {args.rate:g}/s, "
        f"at most ~{estimate / 60:.0f} min; pinned: {bench.pinned}; project event loop {args.event_loop}, "
        f"stream_interval_ms {'default' if args.stream_interval_ms is None else args.stream_interval_ms}")
    renice(os.getpid(), args.nice)
    previous_nice = set_session_nice(args.nice) if args.nice else None
    started = time.monotonic()
    try:
        return asyncio.run(run(Context(args, bench)))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.close()
        set_session_nice(previous_nice)
        log(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
