"""The single-file build, dist/chatgpt-api.pyz (scripts/build-pyz), run the way the systemd unit runs it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatgpt.domain import texts

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "dist" / "chatgpt-api.pyz"
SECRETS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATGPT_ADMIN_TOKEN", "BAIXING_API_KEY")
START_SECONDS = 10.0
STOP_SECONDS = 10.0


def built_pyz() -> Path:
    """The built file; its absence fails the test (CI builds it before pytest), it does not skip."""
    if not PYZ.is_file():
        pytest.fail(f"{PYZ.relative_to(ROOT)} does not exist: build it with scripts/build-pyz "
                    "(it needs pip to reach the package registry; .ci/run builds it before pytest).",
                    pytrace=False)
    return PYZ


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bare_environment(tmp_path: Path) -> dict[str, str]:
    """The test's environment without any secret, unpacking the file's libraries under tmp_path."""
    env = {name: value for name, value in os.environ.items() if name not in SECRETS}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")  # as the unit sets it; the default is ~/.shiv
    return env


async def wait_for_status(base: str, process: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """Poll `//status` until it answers; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + START_SECONDS
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the .pyz exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(f"//status did not answer within {START_SECONDS} s:\n{log.read_text(errors='replace')}")
            try:
                async with http.get(f"{base}//status") as response:
                    body: dict[str, Any] = await response.json()
                    return body
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.1)


async def ask_anonymously(base: str) -> tuple[dict[str, Any], str]:
    """One anonymous `/v1` question, and the demo page a browser gets at `/`."""
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hello?"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
        async with http.get(f"{base}/", headers={"Accept": "text/html"}) as response:
            assert response.status == 200
            page = await response.text()
    return answer, page


async def test_pyz_serves_offline_without_a_key_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    pyz, port = built_pyz(), free_port()
    # Relative paths, as in the shipped settings: they land in the working directory, as under systemd.
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"server": {"host": "127.0.0.1"}, "state": {"file": "state.json"},
                                    "images": {"folder": "static"}}), encoding="utf-8")
    log = tmp_path / "server.log"
    # The interpreter the test venv was made from, isolated (-I): it has none of the dependencies,
    # so the file must carry every one of them, as on a server with a bare python3.
    python = getattr(sys, "_base_executable", sys.executable)
    with log.open("wb") as out:
        process = subprocess.Popen([python, "-I", str(pyz), "--port", str(port), "--config", str(settings)],
                                   cwd=tmp_path, env=bare_environment(tmp_path), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        status = await wait_for_status(base, process, log)
        answer, page = await ask_anonymously(base)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=STOP_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")

    assert (status["status"], status["msg"], status["state"]) == ("000000", "SUCCESS", True)
    assert isinstance(status["timestamp"], int)
    assert "provider: offline" in output
    assert answer["choices"][0]["message"]["content"] == texts.OFFLINE_ANSWER
    assert "<html" in page.lower()  # package data travels inside the file
    assert code == 0, output
    assert "Traceback" not in output
    # The question was counted, and the count written to the working directory at shutdown.
    state = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert state["quota"]["used"] == {"127.0.0.1": 1}
