"""Starting `python app.py` where it cannot serve (PROTOCOL.md E.3): another instance on the same state
file, a busy port, a host that does not resolve, a short admin token: one line naming what to change,
exit status 2, no traceback, and nothing of the live instance touched."""
from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from chatgpt.server.heap import MIDDLE_THRESHOLD, YOUNG_THRESHOLD, freeze_startup_heap
from chatgpt.server.state import StateFile, StateLock, StateLocked, serialise
from tests.conftest import MakeClient

ROOT = Path(__file__).resolve().parent.parent
SECRET_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATGPT_ADMIN_TOKEN", "BAIXING_API_KEY")
SHORT_TOKEN = "adm-short-tok"  # 13 characters: under the 16 required


def run_app(folder: Path, settings: dict[str, Any], *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """`python app.py --config settings.yaml ...` in `folder`; it must exit by itself."""
    path = folder / "start.yaml"
    path.write_text(json.dumps(settings), encoding="utf-8")  # JSON is valid YAML
    clean = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--config", str(path), *args], cwd=folder,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The whole output of a refused start: exactly one line, on stderr, exit status 2."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatgpt-api: ")
    return lines[0]


async def test_a_second_process_on_the_same_state_file_refuses_to_start_and_leaves_the_live_temp_file(
        make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client()  # the live instance, holding state.json's lock
    live_temp = tmp_path / ".state.json.k2j4h5.tmp"  # as if the live instance were saving right now
    live_temp.write_text("{}", encoding="utf-8")
    # Its port too: the state file is what the refusal names (the same instance started twice).
    result = run_app(tmp_path, {"server": {"host": "127.0.0.1", "port": client.port},
                                "state": {"file": str(tmp_path / "state.json")}})
    line = one_line(result)
    assert "state file" in line and "in use by another process" in line and f"pid {os.getpid()}" in line
    assert live_temp.exists(), "the refused process removed the live instance's temp file"
    response = await client.get("/status")  # the live instance goes on serving
    assert response.status == 200


def test_a_busy_port_stops_the_start_with_one_line_naming_server_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app(tmp_path, {"server": {"host": "127.0.0.1", "port": port}})
    line = one_line(result)
    assert line.startswith("chatgpt-api: setting server.port: ") and str(port) in line and "in use" in line
    assert not (tmp_path / "state.json").exists()  # refused before the state file was touched


def test_a_port_flag_on_a_busy_port_is_named_the_same_way(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app(tmp_path, {"server": {"host": "127.0.0.1"}}, "--port", str(port))
    assert one_line(result).startswith("chatgpt-api: setting server.port: ")


def test_a_host_that_cannot_be_resolved_stops_the_start_with_one_line_naming_server_host(tmp_path: Path) -> None:
    # An empty label fails before any DNS query is made: the test needs no network.
    result = run_app(tmp_path, {"server": {"host": "api..example", "port": 8080}})
    line = one_line(result)
    assert line.startswith("chatgpt-api: setting server.host: ") and "api..example" in line


def test_an_admin_token_under_16_characters_in_the_file_stops_the_start_without_showing_it(tmp_path: Path) -> None:
    result = run_app(tmp_path, {"admin": {"token": SHORT_TOKEN}}, "--check")
    line = one_line(result)
    assert "admin.token" in line and "16" in line
    assert SHORT_TOKEN not in line


def test_an_admin_token_under_16_characters_from_the_environment_is_named_as_the_variable(tmp_path: Path) -> None:
    result = run_app(tmp_path, {}, "--check", env={"CHATGPT_ADMIN_TOKEN": SHORT_TOKEN})
    line = one_line(result)
    assert "CHATGPT_ADMIN_TOKEN" in line and "16" in line
    assert SHORT_TOKEN not in line


def test_an_admin_token_of_16_characters_is_accepted(tmp_path: Path) -> None:
    result = run_app(tmp_path, {}, "--check", env={"CHATGPT_ADMIN_TOKEN": "a" * 16})
    assert result.returncode == 0, result.stderr


# --- the lock and the state file on their own --------------------------------------------------------------------

def test_the_state_lock_is_held_until_released(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path / "state.json"), StateLock(tmp_path / "state.json")
    first.acquire()
    with pytest.raises(StateLocked, match="in use by another process"):
        second.acquire()
    assert first.held and not second.held
    first.release()
    second.acquire()
    second.release()


def test_leftover_temp_files_are_removed_only_under_the_lock(tmp_path: Path) -> None:
    temp = tmp_path / ".state.json.abc123.tmp"
    temp.write_text("{}", encoding="utf-8")
    state = StateFile(tmp_path / "state.json", {})
    state.load(StateLock(tmp_path / "state.json"))  # not acquired: another process may own the temp file
    assert temp.exists()
    lock = StateLock(tmp_path / "state.json")
    lock.acquire()
    try:
        state.load(lock)
    finally:
        lock.release()
    assert not temp.exists()


def test_the_piecewise_serialisation_is_exactly_json_dumps() -> None:
    chat = {f"{n:032x}": {"owner": "203.0.113.7 anonymous", "used": 1000.5 + n,
                          "turns": [("问题 \ud800", f"answer {n}"), ("q", "a\n\"quoted\"")]} for n in range(200)}
    data = {"version": 1, "chat": chat, "quota": {"day": "2026-12-05", "used": {"::/64": 2}}, "empty": {}}
    assert serialise(data) == json.dumps(data, sort_keys=True)
    assert json.loads(serialise(data))["chat"]["00000000000000000000000000000007"]["turns"][0] == ["问题 \ud800",
                                                                                                 "answer 7"]


async def test_the_serving_process_freezes_its_start_up_heap_and_collects_the_older_generations_rarely() -> None:
    # What app.py's main() adds to on_startup (not the tests' apps: they would freeze each other's objects).
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        await freeze_startup_heap(web.Application())
        assert gc.get_threshold() == (YOUNG_THRESHOLD, MIDDLE_THRESHOLD, 10)
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
