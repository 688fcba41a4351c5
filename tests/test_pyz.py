"""The single-file build (scripts/build-pyz, built here into a temp folder), run the way the systemd unit runs it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatgpt.domain import texts
from tests.helpers.programs import require_program, unavailable
from tests.helpers.servers import started_port, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATGPT_ADMIN_TOKEN", "BAIXING_API_KEY")
BUILD_SECONDS = 600.0
STOP_SECONDS = 10.0
# What pip says when it cannot reach the package index: the build needs it, so offline the test skips.
OFFLINE = re.compile(r"Failed to establish a new connection|Temporary failure in name resolution|Name or service "
                     r"not known|Network is unreachable|No matching distribution found|ProxyError|ConnectTimeout")


@pytest.fixture(scope="module")
def built_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pyz built from these sources by scripts/build-pyz, on this interpreter, in a temp folder.
    pip fetches the dependencies: offline the test skips saying so (fails under CHATGPT_API_REQUIRE_ALL=1)."""
    pyz = tmp_path_factory.mktemp("pyz") / "chatgpt-api.pyz"
    bash = require_program("bash", "bash")
    # The venv's bin first: the script runs `python -m shiv`, and shiv runs pip, with this interpreter.
    env = {**os.environ, "PYTHON": sys.executable, "PIP_RETRIES": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    built = subprocess.run([bash, str(ROOT / "scripts" / "build-pyz"), str(pyz)], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, errors="replace", timeout=BUILD_SECONDS, check=False)
    output = built.stdout + built.stderr
    if built.returncode != 0 and OFFLINE.search(output):
        unavailable("cannot build the .pyz: pip could not reach the package index for the dependencies "
                    f"({OFFLINE.search(output).group(0)})")  # type: ignore[union-attr]
    assert built.returncode == 0 and pyz.is_file(), f"scripts/build-pyz failed:\n{output[-4000:]}"
    return pyz


def bare_environment(tmp_path: Path) -> dict[str, str]:
    """The test's environment without any secret, unpacking the file's libraries under tmp_path."""
    env = {name: value for name, value in os.environ.items() if name not in SECRETS}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")  # as the unit sets it; the default is ~/.shiv
    return env


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


async def test_pyz_serves_offline_without_a_key_and_exits_cleanly_on_sigterm(tmp_path: Path, built_pyz: Path) -> None:
    # Relative paths, as in the shipped settings: they land in the working directory, as under systemd.
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"server": {"host": "127.0.0.1"}, "state": {"file": "state.json"},
                                    "images": {"folder": "static"}}), encoding="utf-8")
    log = tmp_path / "server.log"
    # The interpreter the test venv was made from, isolated (-I): it has none of the dependencies,
    # so the file must carry every one of them, as on a server with a bare python3.
    python = getattr(sys, "_base_executable", sys.executable)
    with log.open("wb") as out:
        process = subprocess.Popen([python, "-I", str(built_pyz), "--port", "0", "--config", str(settings)],
                                   cwd=tmp_path, env=bare_environment(tmp_path), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{await started_port(process, log)}"
        status = await wait_until_serving(process, base, lambda: log.read_text(errors="replace"), name="the .pyz")
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
    # The state file was written to the working directory at shutdown; the offline answer cost no
    # quota (PROTOCOL.md E.1: the built-in provider is free).
    state = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert state["quota"]["used"] == {}


def test_the_unit_lets_the_process_hold_many_sockets() -> None:
    # systemd's default of 1,024 descriptors is exhausted by about a thousand idle websockets.
    unit = (ROOT / "deploy" / "chatgpt-api.service").read_text()
    service = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r"^LimitNOFILE=(\d+)$", service, re.M) == ["65536"]
