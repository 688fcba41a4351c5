"""Run the benchmark suite: every scenario against the raw relay and the project, in one run.

    python bench/run.py [--quick] [--only N[,N...]]

Prints one JSON line per scenario on stdout; progress goes to stderr. The server under test
runs pinned to core 0 (`taskset -c 0`); the fake upstream and the load generator run on core 1.
Everything listens on 127.0.0.1 and is stopped at the end, also on Ctrl-C or an error.

Scenarios: 1 v1_throughput, 2 ws_throughput, 3 ttft_overhead, 4 paced_cpu, 5 memory,
6 startup, 7 long_answer.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import emit, r, raise_nofile, rss_kb  # noqa: E402

PY = sys.executable
PYZ = REPO / "dist" / "chatgpt-api.pyz"
API_KEY = "sk-bench-0001"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preexec() -> None:
    raise_nofile()  # the server holds 2,000 sockets in scenario 5
    os.setpgrp()  # our own group: Ctrl-C in the terminal reaches us, and we stop the children


class Proc:
    """A child process with its log file; `stop()` is idempotent."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, **kwargs: Any) -> None:
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, cwd=cwd, stdout=kwargs.pop("stdout", self.log_file),
                                      stderr=self.log_file, preexec_fn=_preexec, **kwargs)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(6)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log_file.close()


class Bench:
    """Starts and tracks every process of a run; `close()` stops them all."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="chatgpt-bench-"))
        self.procs: list[Proc] = []
        self.pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
        self.upstream: Proc | None = None
        self.upstream_base = ""

    # -- processes
    def pin(self, core: int) -> list[str]:
        return ["taskset", "-c", str(core)] if self.pinned else []

    def spawn(self, name: str, argv: list[str], core: int, cwd: Path = REPO, **kwargs: Any) -> Proc:
        proc = Proc(name, self.pin(core) + argv, self.tmp / f"{name}-{len(self.procs)}.log", cwd, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc | None) -> None:
        if proc is not None:
            proc.stop()

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                log(f"could not stop {proc.name}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def wait_ready(self, proc: Proc, port: int, timeout: float = 30.0, poll: float = 0.02) -> float:
        """Seconds until GET //status answers 200; raises if the process dies or never answers."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    conn.request("GET", "//status")
                    response = conn.getresponse()
                    body = response.read()
                finally:
                    conn.close()
                if response.status == 200:
                    if b'"state":true' not in body.replace(b" ", b""):
                        raise RuntimeError(f"{proc.name} answered //status without state true: {body[:200]!r}")
                    return time.perf_counter() - started
            except (ConnectionError, OSError, http.client.HTTPException):
                pass
            time.sleep(poll)
        raise RuntimeError(f"{proc.name} did not answer //status within {timeout} s: {proc.tail()}")

    def start_upstream(self) -> None:
        port = free_port()
        self.upstream = self.spawn("fake_upstream", [PY, str(BENCH / "fake_upstream.py"), "--port", str(port)], 1)
        self.upstream_base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 20
        while True:
            try:
                self.configure(20, 0)
                return
            except OSError:
                if not self.upstream.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"fake upstream did not start: {self.upstream.tail()}") from None
                time.sleep(0.05)

    def configure(self, tokens: int, rate: float) -> None:
        """Set the fake upstream's answer length and pacing for the next requests."""
        conn = http.client.HTTPConnection("127.0.0.1", int(self.upstream_base.split(":")[2].split("/")[0]), timeout=5)
        try:
            conn.request("POST", "/bench/config", json.dumps({"tokens": tokens, "rate": rate}),
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
        finally:
            conn.close()

    def upstream_stats(self) -> dict[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", int(self.upstream_base.split(":")[2].split("/")[0]), timeout=5)
        try:
            conn.request("GET", "/bench/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def project_settings(self, port: int) -> Path:
        """A settings file that points the project at the fake upstream and never refuses."""
        folder = self.tmp / f"project-{port}"
        (folder / "static").mkdir(parents=True, exist_ok=True)
        text = f"""# written by bench/run.py
server:
  host: 127.0.0.1
  port: {port}
upstream:
  provider: openai
  base_url: {self.upstream_base}
  api_keys: ["{API_KEY}"]
  read_timeout: 300
limits:
  http_per_second: 1000000
  ws_per_minute: 1000000
quota:
  daily_questions: 100000000
images:
  folder: {folder / 'static'}
state:
  file: {folder / 'state.json'}
logging:
  level: WARNING              # also turns aiohttp's access log off (it logs at INFO)
"""
        path = folder / "settings.yaml"
        path.write_text(text)
        return path

    def start_raw(self) -> tuple[Proc, str]:
        port = free_port()
        proc = self.spawn("raw_relay", [PY, str(BENCH / "raw_relay.py"), "--port", str(port),
                                        "--upstream", self.upstream_base], 0)
        self.wait_ready(proc, port)
        return proc, f"http://127.0.0.1:{port}"

    def start_project(self, argv: list[str] | None = None, cwd: Path = REPO) -> tuple[Proc, str]:
        port = free_port()
        config = self.project_settings(port)
        argv = argv or [PY, str(REPO / "app.py")]
        proc = self.spawn("project", argv + ["--config", str(config), "--port", str(port)], 0, cwd=cwd)
        self.wait_ready(proc, port)
        return proc, f"http://127.0.0.1:{port}"

    def load(self, args: list[str], timeout: float = 300) -> dict[str, Any]:
        """Run the load generator on core 1 and return its JSON result."""
        argv = self.pin(1) + [PY, str(BENCH / "load.py")] + args
        done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, timeout=timeout, preexec_fn=_preexec)
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed ({done.returncode}): {' '.join(args)}")
        return json.loads(lines[-1])


# ------------------------------------------------------------------ scenarios

def both(bench: Bench, run: Callable[[str, Proc, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Start the raw relay and the project, run `run(name, proc, base)` on each in turn, stop both."""
    raw = project = None
    try:
        raw, raw_base = bench.start_raw()
        project, project_base = bench.start_project()
        results = {}
        for name, proc, base in (("raw", raw, raw_base), ("project", project, project_base)):
            log(f"  {name} …")
            results[name] = run(name, proc, base)
            if not proc.alive():
                raise RuntimeError(f"{name} died during the scenario: {proc.tail()}")
        return results
    finally:
        bench.stop(project)
        bench.stop(raw)


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if not a or b is None else round(b / a, digits)


def detail(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("answers", "answers_per_s", "errors", "error_sample", "ttft_ms_p50", "ttft_ms_p99", "latency_ms_p50",
            "latency_ms_p99", "frames_per_answer", "bytes_per_answer", "window_s", "cpu_pct")
    return {k: res[k] for k in keep if k in res}


def s1_v1_throughput(bench: Bench) -> dict[str, Any]:
    warm, dur = (1, 4) if bench.quick else (2, 15)
    bench.configure(20, 0)
    res = both(bench, lambda name, proc, base: bench.load(
        ["v1", "--url", base, "--concurrency", "64", "--warmup", str(warm), "--duration", str(dur),
         "--watch", f"server={proc.pid},upstream={bench.upstream.pid}"]))
    raw, proj = res["raw"]["answers_per_s"], res["project"]["answers_per_s"]
    return {"scenario": "v1_throughput", "concurrency": 64, "tokens": 20, "unit": "answers/s",
            "raw": raw, "project": proj, "ratio": ratio(raw, proj), "target_ratio": 0.6,
            "project_ttft_ms_p50": res["project"]["ttft_ms_p50"], "project_ttft_ms_p99": res["project"]["ttft_ms_p99"],
            "raw_detail": detail(res["raw"]), "project_detail": detail(res["project"])}


def s2_ws_throughput(bench: Bench) -> dict[str, Any]:
    warm, dur = (1, 4) if bench.quick else (2, 15)
    bench.configure(20, 0)
    res = both(bench, lambda name, proc, base: bench.load(
        ["ws", "--url", base, "--sockets", "64", "--warmup", str(warm), "--duration", str(dur),
         "--watch", f"server={proc.pid},upstream={bench.upstream.pid}"]))
    raw, proj = res["raw"]["answers_per_s"], res["project"]["answers_per_s"]
    return {"scenario": "ws_throughput", "sockets": 64, "tokens": 20, "unit": "questions/s",
            "raw": raw, "project": proj, "ratio": ratio(raw, proj), "target_ratio": 0.5,
            "raw_detail": detail(res["raw"]), "project_detail": detail(res["project"])}


def s3_ttft_overhead(bench: Bench) -> dict[str, Any]:
    count = 100 if bench.quick else 300
    bench.configure(20, 0)
    raw = project = None
    try:
        raw, raw_base = bench.start_raw()
        project, project_base = bench.start_project()
        out: dict[str, Any] = {"scenario": "ttft_overhead", "concurrency": 1, "count": count, "tokens": 20,
                               "unit": "ms", "target_ms_p50": 0.5}
        for kind in ("v1", "ws"):
            log(f"  {kind}: {count} sequential requests each, alternating raw / project …")
            res = bench.load(["ttft", "--kind", kind, "--count", str(count),
                              "--targets", f"raw={raw_base},project={project_base}"])
            rr, pp = res["raw"], res["project"]
            sub = {"overhead_ms_p50": _diff(pp["ttft_ms_p50"], rr["ttft_ms_p50"]),
                   "overhead_ms_p99": _diff(pp["ttft_ms_p99"], rr["ttft_ms_p99"]), "raw": rr, "project": pp}
            if kind == "v1":
                out["overhead_ms_p50"], out["overhead_ms_p99"] = sub["overhead_ms_p50"], sub["overhead_ms_p99"]
            out[kind] = sub
        return out
    finally:
        bench.stop(project)
        bench.stop(raw)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def s4_paced_cpu(bench: Bench) -> dict[str, Any]:
    streams, tokens, rate = 500, 200, 50
    bench.configure(tokens, rate)
    before = bench.upstream_stats()

    def run(name: str, proc: Proc, base: str) -> dict[str, Any]:
        res = bench.load(["ws", "--url", base, "--sockets", str(streams), "--count", str(streams),
                          "--watch", f"server={proc.pid},upstream={bench.upstream.pid}"], timeout=240)
        relayed = res["answers"] * tokens
        res["cpu_ms_per_1k_tokens"] = r(1000 * res["cpu_s"]["server"] / (relayed / 1000), 2) if relayed else None
        return res

    res = both(bench, run)
    after = bench.upstream_stats()
    raw, proj = res["raw"], res["project"]
    return {"scenario": "paced_cpu", "streams": streams, "tokens": tokens, "tokens_per_s": rate,
            "unit": "server CPU ms per 1,000 relayed tokens",
            "raw": raw["cpu_ms_per_1k_tokens"], "project": proj["cpu_ms_per_1k_tokens"],
            "ratio": ratio(raw["cpu_ms_per_1k_tokens"], proj["cpu_ms_per_1k_tokens"]), "target_ratio_max": 2.0,
            "frames_per_answer": {"raw": raw["frames_per_answer"], "project": proj["frames_per_answer"]},
            "bytes_per_answer": {"raw": raw["bytes_per_answer"], "project": proj["bytes_per_answer"]},
            "answers": {"raw": raw["answers"], "project": proj["answers"]},
            "errors": {"raw": raw["errors"], "project": proj["errors"]},
            "wall_s": {"raw": raw["window_s"], "project": proj["window_s"]},
            "upstream_posts": after["requests"] - before["requests"],
            **({"project_error_sample": proj["error_sample"]} if "error_sample" in proj else {})}


def _memory_of(bench: Bench, start: Callable[[], tuple[Proc, str]], sockets: int) -> dict[str, Any]:
    proc, base = start()
    try:
        time.sleep(1.0)
        idle = rss_kb(proc.pid)
        argv = bench.pin(1) + [PY, str(BENCH / "load.py"), "hold", "--url", base, "--sockets", str(sockets)]
        holder = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_preexec)
        try:
            line = holder.stdout.readline()
            if not line:
                raise RuntimeError("the socket holder exited early")
            opened = json.loads(line)
            time.sleep(1.5)
            loaded = rss_kb(proc.pid)
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            holder.wait(60)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        return {"idle_mb": r(idle / 1024, 1), "with_sockets_mb": r(loaded / 1024, 1),
                "per_socket_kb": r((loaded - idle) / sockets, 2), "open": opened["open"],
                "heartbeat_ok": opened["heartbeat_ok"]}
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
    if PYZ.is_file():
        log(f"  {PYZ.relative_to(REPO)} …")
        times = _startup_times(bench, [PY, str(PYZ)], bench.tmp, runs)  # not from the repo: it must stand alone
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

        res = both(bench, run)
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


SCENARIOS: dict[int, tuple[str, Callable[[Bench], dict[str, Any]]]] = {
    1: ("v1_throughput", s1_v1_throughput), 2: ("ws_throughput", s2_ws_throughput),
    3: ("ttft_overhead", s3_ttft_overhead), 4: ("paced_cpu", s4_paced_cpu), 5: ("memory", s5_memory),
    6: ("startup", s6_startup), 7: ("long_answer", s7_long_answer),
}


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    return (f"{os.cpu_count()} cores ({model or platform.machine()}), Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}, {platform.system()} {platform.release()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows and counts (about a minute)")
    parser.add_argument("--only", action="append", default=[], help="scenario number(s), e.g. --only 3 or 1,4")
    args = parser.parse_args()
    chosen = sorted({int(n) for item in args.only for n in item.split(",")}) or sorted(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args.quick)
    if bench.pinned:
        os.sched_setaffinity(0, {1})  # this process stays off the server's core too
    else:
        log("fewer than 2 cores or no taskset: running UNPINNED, figures are not comparable")
    log(f"machine: {machine()}; pinned: {bench.pinned}; {'quick' if args.quick else 'full'} run")
    failed = 0
    started = time.monotonic()
    try:
        bench.start_upstream()
        for number in chosen:
            name, scenario = SCENARIOS[number]
            log(f"scenario {number}: {name}")
            t0 = time.monotonic()
            try:
                result = scenario(bench)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failed += 1
                result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            result["seconds"] = round(time.monotonic() - t0, 1)
            emit(result)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.close()
        log(f"done in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
