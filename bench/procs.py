"""The benchmark's processes: the fake upstream, the servers under test (pinned) and the load."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import raise_nofile

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

PY = sys.executable
PYZ = REPO / "dist" / "chatgpt-api.pyz"
API_KEY = "sk-bench-0001"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def preexec() -> None:
    raise_nofile()  # the server holds 2,000 sockets in scenario 5
    os.setpgrp()  # own group: Ctrl-C in the terminal reaches only run.py, which stops every child


def drop_setting(text: str, section: str, key: str) -> str:
    """The bench's settings text without `section.key` (two levels, two-space indents, as written here)."""
    out, current = [], None
    for line in text.splitlines(keepends=True):
        if line[:1].isalpha():
            current = line.split(":", 1)[0]
        elif current == section and line.startswith(f"  {key}:"):
            continue
        out.append(line)
    return "".join(out)


class Proc:
    """A child process with its log file; `stop()` is idempotent."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, **kwargs: Any) -> None:
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, cwd=cwd, stdout=kwargs.pop("stdout", self.log_file),
                                      stderr=self.log_file, preexec_fn=preexec, **kwargs)

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

    def __init__(self, quick: bool, pyz: Path = PYZ) -> None:
        self.quick = quick
        self.pyz = pyz
        self.tmp = Path(tempfile.mkdtemp(prefix="chatgpt-bench-"))
        self.procs: list[Proc] = []
        self.pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
        self.upstream: Proc | None = None
        self.upstream_base = ""
        self.event_loop = "auto"  # the project's server.event_loop: auto (uvloop when installed) | asyncio | uvloop
        self.stream_interval_ms: int | None = None  # the project's server.stream_interval_ms; None: its default
        self.before: Path | None = None  # a checkout of an earlier commit, measured beside the project (--before)

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
            stats: dict[str, int] = json.loads(conn.getresponse().read())
            return stats
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
  event_loop: {self.event_loop}
{"" if self.stream_interval_ms is None else f"  stream_interval_ms: {self.stream_interval_ms}"}
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
ws:
  max_sockets_per_ip: 100000  # every bench socket comes from 127.0.0.1
  max_sockets: 100000
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

    def start_before(self, checkout: Path) -> tuple[Proc, str]:
        """The project as it was at an earlier commit (`checkout`: a `git worktree add` of it), on the same
        settings less the keys that version does not know (it refuses unknown keys)."""
        return self.start_project([PY, str(checkout / "app.py")], checkout, "before",
                                  fit=lambda config: self.fit_settings(checkout, config))

    def fit_settings(self, checkout: Path, config: Path) -> None:
        """Leave out of `config` each key the version at `checkout` refuses as unknown (its own --check)."""
        for _ in range(20):
            check = subprocess.run([PY, str(checkout / "app.py"), "--config", str(config), "--check"], cwd=checkout,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if check.returncode == 0:
                return
            unknown = re.search(r"setting (\w+)\.(\w+): unknown key", check.stdout)
            if unknown is None:
                break
            config.write_text(drop_setting(config.read_text(), *unknown.groups()))
            log(f"  before: {unknown[1]}.{unknown[2]} left out (that version does not know it)")
        raise RuntimeError(f"{checkout} refuses the bench's settings: {check.stdout.strip()[-500:]}")

    def start_project(self, argv: list[str] | None = None, cwd: Path = REPO, name: str = "project",
                      fit: Callable[[Path], None] | None = None) -> tuple[Proc, str]:
        """The project (or `argv`, another version of it) on the bench's settings, adapted by `fit`."""
        port = free_port()
        config = self.project_settings(port)
        if fit is not None:
            fit(config)
        argv = argv or [PY, str(REPO / "app.py")]
        proc = self.spawn(name, argv + ["--config", str(config), "--port", str(port)], 0, cwd=cwd)
        self.wait_ready(proc, port)
        return proc, f"http://127.0.0.1:{port}"

    def load(self, args: list[str], timeout: float = 300) -> dict[str, Any]:
        """Run the load generator on core 1 and return its JSON result."""
        argv = self.pin(1) + [PY, str(BENCH / "load.py")] + args
        done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, timeout=timeout, preexec_fn=preexec)
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed ({done.returncode}): {' '.join(args)}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

