"""The scenarios: each starts the raw relay and the project, loads both, returns one result."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import r, rss_kb
from procs import BENCH, PY, REPO, Bench, Proc, free_port, log, preexec


@contextmanager
def running_servers(bench: Bench) -> Iterator[list[tuple[str, Proc, str]]]:
    """The raw relay, the project at `--before` when given, and the project, as (name, process, base URL);
    each is stopped on the way out, also those that started before one failed to."""
    servers: list[tuple[str, Proc, str]] = []
    try:
        servers.append(("raw", *bench.start_raw()))
        if bench.before is not None:
            servers.append(("before", *bench.start_before(bench.before)))
        servers.append(("project", *bench.start_project()))
        yield servers
    finally:
        for _, proc, _ in reversed(servers):
            bench.stop(proc)


def both(bench: Bench, run: Callable[[str, Proc, str], dict[str, Any]],
         rounds: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Start the raw relay and the project (and, with `--before`, the project at an earlier commit), then
    `run(name, proc, base)` on each in turn, `rounds` times (raw, project, raw, project, …) so a drifting
    machine hits them alike; stop them."""
    with running_servers(bench) as servers:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in servers}
        for n in range(rounds):
            for name, proc, base in servers:
                log(f"  {name}" + (f" (round {n + 1}/{rounds})" if rounds > 1 else "") + " …")
                results[name].append(run(name, proc, base))
                if not proc.alive():
                    raise RuntimeError(f"{name} died during the scenario: {proc.tail()}")
        return results


# A server below SERVER_BUSY % of its core while the load side's core is above LOAD_SIDE_BUSY %
# is held back by the load side.
LOAD_SIDE_BUSY = 90.0
SERVER_BUSY = 95.0


def rounds_of(bench: Bench) -> int:
    return 1 if bench.quick else 3


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 1)


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if not a or b is None else round(b / a, digits)


def detail(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("answers", "answers_per_s", "errors", "error_sample", "ttft_ms_p50", "ttft_ms_p99", "latency_ms_p50",
            "latency_ms_p99", "frames_per_answer", "bytes_per_answer", "window_s", "cpu_pct", "steal_pct")
    return {k: res[k] for k in keep if k in res}


def _throughput(bench: Bench, mode: str, clients: int) -> dict[str, Any]:
    """Answers/s of `clients` concurrent v1 requests or websockets, 20 unpaced tokens each."""
    warm, dur = (1, 4) if bench.quick else (2, 8)
    bench.configure(20, 0)
    flag = "--concurrency" if mode == "v1" else "--sockets"
    res = both(bench, lambda name, proc, base: bench.load(
        [mode, "--url", base, flag, str(clients), "--warmup", str(warm), "--duration", str(dur),
         "--watch", f"server={proc.pid},upstream={bench.upstream.pid}"]), rounds_of(bench))
    rate = {name: mean([x["answers_per_s"] for x in runs]) for name, runs in res.items()}
    cost = {name: mean([cpu_us(x) for x in runs]) for name, runs in res.items()}
    out: dict[str, Any] = {"raw": rate["raw"], "cpu_us_per_answer": cost,
                           "runs": {name: [x["answers_per_s"] for x in runs] for name, runs in res.items()}}
    # The project's figures, and the earlier commit's in the same rounds (`--before`), under prefixed keys.
    for name, prefix in (("project", ""), ("before", "before_")):
        if name in res:
            out.update({name: rate[name], f"{prefix}ratio": ratio(rate["raw"], rate[name]),
                        f"{prefix}round_ratios": [ratio(a["answers_per_s"], b["answers_per_s"])
                                                  for a, b in zip(res["raw"], res[name])],
                        # Server CPU per answer: the ratio were both servers held at 100% of their core.
                        f"{prefix}cost_ratio": ratio(cost[name], cost["raw"])})
    out.update(raw_detail=detail(res["raw"][0]), project_detail=detail(res["project"][0]))
    warnings = load_side_warnings(res)
    if warnings:
        out["warnings"] = warnings
    return out


def cpu_us(res: dict[str, Any]) -> float:
    """Server CPU per answer in a load run (µs)."""
    return 1e4 * res["cpu_pct"]["server"] / res["answers_per_s"] if res["answers_per_s"] else math.inf


def load_side_warnings(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The load side (the fake upstream and the load generator share core 1) busy enough to hold a server
    back: that server's answers/s are then a floor, and a ratio against it is off."""
    out = []
    for name, runs in res.items():
        for n, x in enumerate(runs, 1):
            busy = x["cpu_pct"].get("upstream", 0) + x["cpu_pct"].get("load", 0)
            if busy >= LOAD_SIDE_BUSY and x["cpu_pct"].get("server", 100) < SERVER_BUSY:
                out.append(f"{name} round {n}: the load side's core was {busy:.0f}% busy while the server's was "
                           f"{x['cpu_pct']['server']:.0f}%: its answers/s are the load side's limit, not its own")
    return out


def s1_v1_throughput(bench: Bench) -> dict[str, Any]:
    out = _throughput(bench, "v1", 64)
    return {"scenario": "v1_throughput", "concurrency": 64, "tokens": 20, "unit": "answers/s", **out,
            "target_ratio": 0.6, "project_ttft_ms_p50": out["project_detail"]["ttft_ms_p50"],
            "project_ttft_ms_p99": out["project_detail"]["ttft_ms_p99"]}


def s2_ws_throughput(bench: Bench) -> dict[str, Any]:
    out = _throughput(bench, "ws", 64)
    return {"scenario": "ws_throughput", "sockets": 64, "tokens": 20, "unit": "questions/s", **out,
            "target_ratio": 0.5}


def s3_ttft_overhead(bench: Bench) -> dict[str, Any]:
    count = 100 if bench.quick else 300
    bench.configure(20, 0)
    with running_servers(bench) as servers:
        targets = ",".join(f"{name}={base}" for name, _, base in servers)
        out: dict[str, Any] = {"scenario": "ttft_overhead", "concurrency": 1, "count": count, "tokens": 20,
                               "unit": "ms", "target_ms_p50": 0.5}
        for kind in ("v1", "ws"):
            log(f"  {kind}: {count} sequential requests each, alternating {' / '.join(n for n, _, _ in servers)} …")
            res = bench.load(["ttft", "--kind", kind, "--count", str(count), "--targets", targets])
            rr, pp = res["raw"], res["project"]
            sub = {"overhead_ms_p50": _diff(pp["ttft_ms_p50"], rr["ttft_ms_p50"]),
                   "overhead_ms_p99": _diff(pp["ttft_ms_p99"], rr["ttft_ms_p99"]), "raw": rr, "project": pp}
            if "before" in res:
                sub.update(before=res["before"], before_overhead_ms_p50=_diff(res["before"]["ttft_ms_p50"],
                                                                              rr["ttft_ms_p50"]))
            if kind == "v1":
                out["overhead_ms_p50"], out["overhead_ms_p99"] = sub["overhead_ms_p50"], sub["overhead_ms_p99"]
            out[kind] = sub
        return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def s4_paced_cpu(bench: Bench) -> dict[str, Any]:
    streams, tokens, rate = 500, 200, 50
    bench.configure(tokens, rate)
    before = bench.upstream_stats()

    def run(name: str, proc: Proc, base: str) -> dict[str, Any]:
        bench.configure(tokens, rate)  # restarts the upstream's peak count
        res = bench.load(["ws", "--url", base, "--sockets", str(streams), "--count", str(streams),
                          "--watch", f"server={proc.pid},upstream={bench.upstream.pid}"], timeout=240)
        res["upstream_peak"] = bench.upstream_stats()["peak_in_flight"]
        relayed = res["answers"] * tokens
        res["cpu_ms_per_1k_tokens"] = r(1000 * res["cpu_s"]["server"] / (relayed / 1000), 2) if relayed else None
        return res

    res = both(bench, run, rounds_of(bench))
    after = bench.upstream_stats()

    def total(name: str, key: str) -> int:
        return sum(x[key] for x in res[name])

    cpu = {name: sum(x["cpu_s"]["server"] for x in runs) for name, runs in res.items()}
    per_1k = {name: r(1000 * cpu[name] / (total(name, "answers") * tokens / 1000), 2) if total(name, "answers")
              else None for name in res}
    out = {"scenario": "paced_cpu", "streams": streams, "tokens": tokens, "tokens_per_s": rate,
           "unit": "server CPU ms per 1,000 relayed tokens", "raw": per_1k["raw"], "project": per_1k["project"],
           "ratio": ratio(per_1k["raw"], per_1k["project"]), "target_ratio_max": 2.0,
           "runs": {name: [x["cpu_ms_per_1k_tokens"] for x in runs] for name, runs in res.items()}}
    for key in ("frames_per_answer", "bytes_per_answer"):
        out[key] = {name: mean([x[key] for x in runs]) for name, runs in res.items()}
    for key in ("answers", "errors"):
        out[key] = {name: total(name, key) for name in res}
    out["wall_s"] = {name: [x["window_s"] for x in runs] for name, runs in res.items()}
    out["upstream_posts"] = after["requests"] - before["requests"]
    out["upstream_streams_at_once"] = {name: max(x["upstream_peak"] for x in runs) for name, runs in res.items()}
    samples = [x["error_sample"] for x in res["project"] if "error_sample" in x]
    if samples:
        out["project_error_sample"] = samples[0]
    return out


def _memory_of(bench: Bench, start: Callable[[], tuple[Proc, str]], sockets: int) -> dict[str, Any]:
    """RSS idle after start, then with sockets/2 and with `sockets` idle websockets open."""
    proc, base = start()
    try:
        time.sleep(1.0)
        idle = rss_kb(proc.pid)
        argv = bench.pin(1) + [PY, str(BENCH / "load.py"), "hold", "--url", base, "--sockets", str(sockets),
                               "--steps", "2"]
        holder = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=preexec)
        steps = []
        try:
            for _ in range(2):
                line = holder.stdout.readline()
                if not line:
                    raise RuntimeError("the socket holder exited early")
                opened = json.loads(line)
                time.sleep(1.5)  # let the handshakes' garbage go
                steps.append((opened, rss_kb(proc.pid)))
                holder.stdin.write(b"go\n")
                holder.stdin.flush()
            holder.wait(60)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        (half, rss_half), (full, rss_full) = steps
        return {"idle_mb": r(idle / 1024, 1), "with_sockets_mb": r(rss_full / 1024, 1),
                "per_socket_kb": r((rss_full - idle) / sockets, 2),
                # the second half alone: leaves out one-off growth (first handshakes, allocator arenas)
                "per_socket_kb_second_half": r((rss_full - rss_half) / (full["open"] - half["open"]), 2),
                "open": full["open"], "heartbeat_ok": half["heartbeat_ok"] + full["heartbeat_ok"]}
    finally:
        bench.stop(proc)


def s5_memory(bench: Bench) -> dict[str, Any]:
    sockets = 2000
    log("  project …")
    proj = _memory_of(bench, bench.start_project, sockets)
    log("  raw …")
    raw = _memory_of(bench, bench.start_raw, sockets)
    return {"scenario": "memory", "sockets": sockets, "unit": "MB idle, KB per idle socket",
            "project_idle_mb": proj["idle_mb"], "project_per_socket_kb": proj["per_socket_kb"],
            "raw_idle_mb": raw["idle_mb"], "raw_per_socket_kb": raw["per_socket_kb"],
            "target_idle_mb": 45, "target_per_socket_kb": 20, "project": proj, "raw": raw}


def _startup_times(bench: Bench, argv: list[str], cwd: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        port = free_port()
        config = bench.project_settings(port)
        started = time.perf_counter()
        proc = bench.spawn("startup", argv + ["--config", str(config), "--port", str(port)], 0, cwd=cwd)
        try:
            bench.wait_ready(proc, port, timeout=30, poll=0.002)
            times.append(time.perf_counter() - started)
        finally:
            proc.stop()
    return times


def s6_startup(bench: Bench) -> dict[str, Any]:
    runs = 5
    out: dict[str, Any] = {"scenario": "startup", "runs": runs, "unit": "s to the first //status answer",
                           "target_s": 0.5}
    pyz = bench.pyz
    if pyz.is_file():
        log(f"  {pyz} …")
        times = _startup_times(bench, [PY, str(pyz)], bench.tmp, runs)  # not from the repo: it must stand alone
        out["pyz_s"] = r(statistics.median(times))
        out["pyz_runs"] = [r(t) for t in times]
    else:
        out["error"] = "run scripts/build-pyz first"
    log("  python app.py …")
    times = _startup_times(bench, [PY, str(REPO / "app.py")], REPO, runs)
    out["app_py_s"] = r(statistics.median(times))
    out["app_py_runs"] = [r(t) for t in times]
    return out


def s7_long_answer(bench: Bench) -> dict[str, Any]:
    rate = 1000 if bench.quick else 500
    out: dict[str, Any] = {"scenario": "long_answer", "tokens": 4000, "tokens_per_s": rate,
                           "frame_interval_ms": 50, "unit": "server CPU ms for one answer over the websocket"}
    for tokens in (1000, 4000):
        bench.configure(tokens, rate)

        def run(name: str, proc: Proc, base: str) -> dict[str, Any]:
            res = bench.load(["ws", "--url", base, "--sockets", "1", "--count", "1",
                              "--watch", f"server={proc.pid}"], timeout=120)
            if res["answers"] != 1:
                raise RuntimeError(f"{name}: no answer ({res.get('error_sample')})")
            return {"cpu_ms": r(1000 * res["cpu_s"]["server"], 1), "frames": int(res["frames_per_answer"]),
                    "bytes": int(res["bytes_per_answer"]), "wall_s": res["window_s"]}

        res = {name: runs[0] for name, runs in both(bench, run).items()}
        if tokens == 4000:
            out["raw"], out["project"] = res["raw"]["cpu_ms"], res["project"]["cpu_ms"]
            out["ratio"] = ratio(out["raw"], out["project"])
            out["frames"] = {"raw": res["raw"]["frames"], "project": res["project"]["frames"]}
            out["raw_detail"], out["project_detail"] = res["raw"], res["project"]
        else:
            out["project_1000_tokens"], out["raw_1000_tokens"] = res["project"], res["raw"]
    p1, p4 = out["project_1000_tokens"]["cpu_ms"], out["project"]
    # 1.0: CPU per token does not grow with the answer's length; 4.0 would be quadratic.
    out["project_cpu_per_token_growth_1000_to_4000"] = r((p4 / 4000) / (p1 / 1000), 2) if p1 else None
    return out


def s8_answer_cost(bench: Bench) -> dict[str, Any]:
    """Server CPU per `/v1` answer, split into what every answer costs and what each event adds: the
    bursts of scenario 1 at 1 and at 20 tokens (3 and 22 upstream events), 64 clients, raw relay and
    project alternating. The raw relay's cost does not grow with the events (it relays bytes); the
    project's fixed part is its rules and door, its per-event part the reader, the JSON and the framing.
    `*_cost_ratio_events_free`: the raw relay's 20-token cost over the project's 1-token one, the
    ceiling of what per-event cuts alone can do for scenario 1."""
    warm, dur = (1, 3) if bench.quick else (1, 4)
    rounds = 2 if bench.quick else 4
    out: dict[str, Any] = {"scenario": "answer_cost", "concurrency": 64, "unit": "server CPU us per answer"}
    for tokens in (1, 20):
        bench.configure(tokens, 0)

        def run(name: str, proc: Proc, base: str) -> dict[str, Any]:
            res = bench.load(["v1", "--url", base, "--concurrency", "64", "--warmup", str(warm),
                              "--duration", str(dur), "--watch", f"server={proc.pid}"])
            if res["errors"] or not res["answers_per_s"]:
                raise RuntimeError(f"{name}: {res['errors']} errors ({res.get('error_sample')})")
            return {"us": cpu_us(res), "cpu_pct": res["cpu_pct"]["server"]}

        res = both(bench, run, rounds)
        for name, runs in res.items():
            costs = sorted(x["us"] for x in runs)
            out[f"{name}_{tokens}_tokens"] = r(statistics.median(costs), 1)
            out[f"{name}_{tokens}_tokens_runs"] = [r(c, 1) for c in costs]
    for name in ("project", "before") if bench.before is not None else ("project",):
        one, twenty = out[f"{name}_1_tokens"], out[f"{name}_20_tokens"]
        out[f"{name}_fixed_over_raw_us"] = r(one - out["raw_1_tokens"], 1)
        out[f"{name}_per_event_us"] = r((twenty - one) / 19, 2)
        # The cost ratio scenario 1 would show were every event free (the 20-token answer costing what the
        # 1-token one does): the most that cutting per-event work alone can reach.
        out[f"{name}_cost_ratio_events_free"] = ratio(one, out["raw_20_tokens"])
        out[f"{name}_cost_ratio"] = ratio(twenty, out["raw_20_tokens"])
    out["raw_per_event_us"] = r((out["raw_20_tokens"] - out["raw_1_tokens"]) / 19, 2)
    return out


SCENARIOS: dict[int, tuple[str, Callable[[Bench], dict[str, Any]]]] = {
    1: ("v1_throughput", s1_v1_throughput), 2: ("ws_throughput", s2_ws_throughput),
    3: ("ttft_overhead", s3_ttft_overhead), 4: ("paced_cpu", s4_paced_cpu), 5: ("memory", s5_memory),
    6: ("startup", s6_startup), 7: ("long_answer", s7_long_answer), 8: ("answer_cost", s8_answer_cost),
}


