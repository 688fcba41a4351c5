"""Run the benchmark suite: every scenario against the raw relay and the project, in one run.

    python bench/run.py [--quick] [--only N[,N...]] [--before DIR]

Prints one JSON line per scenario on stdout; progress goes to stderr. The server under test
runs pinned to core 0 (`taskset -c 0`); the fake upstream and the load generator run on core 1,
on uvloop when it is installed (on asyncio's loop they were the limit of the raw relay's figures).
Everything listens on 127.0.0.1 and is stopped at the end, also on Ctrl-C or an error.

Scenarios: 1 v1_throughput, 2 ws_throughput, 3 ttft_overhead, 4 paced_cpu, 5 memory,
6 startup, 7 long_answer, 8 answer_cost.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import emit  # noqa: E402
from procs import PYZ, Bench, log  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402


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
    parser.add_argument("--quick", action="store_true", help="shorter windows and counts (about two minutes)")
    parser.add_argument("--only", action="append", default=[], help="scenario number(s), e.g. --only 3 or 1,4")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the project's server.event_loop (auto: uvloop when installed); the raw relay always "
                             "runs on asyncio's own loop")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="a checkout of an earlier commit (git worktree add DIR <commit>), measured beside the "
                             "project in the same rounds of scenarios 1, 2, 3 and 8")
    parser.add_argument("--pyz", type=Path, default=PYZ, help="zipapp for scenario 6 (default: dist/chatgpt-api.pyz)")
    args = parser.parse_args()
    chosen = sorted({int(n) for item in args.only for n in item.split(",")}) or sorted(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    bench = Bench(args.quick, args.pyz.resolve())
    bench.event_loop = args.event_loop
    if args.before is not None:
        if not (args.before / "app.py").is_file():
            parser.error(f"--before {args.before}: no app.py there")
        bench.before = args.before.resolve()
    if bench.pinned:
        os.sched_setaffinity(0, {1})  # this process stays off the server's core too
    else:
        log("fewer than 2 cores or no taskset: running UNPINNED, figures are not comparable")
    uvloop = importlib.util.find_spec("uvloop") is not None
    log(f"machine: {machine()}; pinned: {bench.pinned}; {'quick' if args.quick else 'full'} run; project event loop: "
        f"{args.event_loop} (uvloop {'installed' if uvloop else 'not installed'})")
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
