"""Settings (PROTOCOL.md D): defaults, strict keys and types, env overrides, and the command line."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from chatgpt.settings import (
    SHORTHAND_KEYS,
    AdminSettings,
    ImagesSettings,
    ModelsSettings,
    ServerSettings,
    Settings,
    SettingsError,
    UpstreamEntry,
    UpstreamSettings,
    load_settings,
)
from tests.helpers.servers import started_port

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    """A settings file with exactly `text` in it."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    """The one-line message of the SettingsError that loading `text` raises."""
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, text), env={})
    message = str(caught.value)
    assert "\n" not in message
    return message


def clean_env() -> dict[str, str]:
    """An environment with no secrets at all: only PATH (and UTF-8 output)."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python app.py ARGS` from the repository, as an operator would type it."""
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, encoding="utf-8", timeout=20, check=False)


def test_with_no_file_and_no_env_every_setting_has_its_default(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert settings.server == ServerSettings(host="0.0.0.0", port=8080, public_url="",
                                             trusted_proxies=("127.0.0.1", "::1"))
    assert (settings.upstream.provider, settings.upstream.base_url, settings.upstream.api_keys) == (
        "auto", "https://api.openai.com/v1", ())
    assert settings.pool_provider == "offline"
    assert settings.public_url == "http://127.0.0.1:8080"


def test_settings_yaml_in_the_working_directory_is_read_when_no_path_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "server:\n  port: 9090\n")
    assert load_settings(None, env={}).server.port == 9090


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing set\n"), env={}) == Settings()


@pytest.mark.parametrize(("text", "key"), [
    ("bogus: 1\n", "bogus"),
    ("server:\n  bogus: 1\n", "server.bogus"),
    ("upstream:\n  api_key: sk-x\n", "upstream.api_key"),
    ("runtime:\n  isdebug: 'TRUE'\n", "runtime.isdebug"),
])
def test_an_unknown_key_is_refused_by_its_full_dotted_name(tmp_path: Path, text: str, key: str) -> None:
    assert load_error(tmp_path, text) == f"setting {key}: unknown key"


@pytest.mark.parametrize(("text", "message"), [
    ("server:\n  port: '8080'\n", "setting server.port: expected an integer, got '8080'"),
    ("upstream:\n  api_keys: [1, 2]\n", "setting upstream.api_keys: expected a list of strings, got [1, 2]"),
    ("upstream:\n  api_keys: sk-one\n", "setting upstream.api_keys: expected a list of strings, got 'sk-one'"),
    ("quota:\n  daily_questions: true\n", "setting quota.daily_questions: expected an integer, got True"),
    ("upstream:\n  temperature: false\n", "setting upstream.temperature: expected a number, got False"),
    ("runtime:\n  status: true\n", "setting runtime.status: expected a string, got True"),
    ("server: 8080\n", "setting server: expected a mapping, got 8080"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert load_error(tmp_path, text) == message


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "upstream:\n  temperature: 1\n  read_timeout: 30\n"), env={})
    assert (settings.upstream.temperature, settings.upstream.read_timeout) == (1.0, 30.0)
    assert type(settings.upstream.temperature) is float


@pytest.mark.parametrize(("text", "message"), [
    ("server:\n  port: 0\n", "setting server.port: expected 1..65535"),
    ("server:\n  port: 65536\n", "setting server.port: expected 1..65535"),
    ("upstream:\n  provider: foo\n", "setting upstream.provider: expected auto, openai or offline"),
    ("images:\n  size: big\n", "setting images.size: expected WIDTHxHEIGHT, e.g. 256x256"),
    ("images:\n  prune_at: '25:00'\n", "setting images.prune_at: expected HH:MM"),
    ("ws:\n  bytes_per_second: -1\n", "setting ws.bytes_per_second: expected 0 or more"),
    ("ws:\n  burst_bytes: -1\n", "setting ws.burst_bytes: expected 0 or more"),
    ("state:\n  redis_url: localhost:6379\n",
     "setting state.redis_url (or REDIS_URL): expected a redis://, rediss:// or unix:// URL"),
    ("state:\n  redis_fail: maybe\n", "setting state.redis_fail: expected open or closed"),
    ("server:\n  event_loop: trio\n", "setting server.event_loop: expected auto, uvloop or asyncio"),
    ("server:\n  stream_interval_ms: -1\n", "setting server.stream_interval_ms: expected 0..1000"),
])
def test_a_value_out_of_range_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert load_error(tmp_path, text) == message


def test_invalid_yaml_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    message = load_error(tmp_path, "server:\n  port: [8080\nupstream: {\n")
    assert message.startswith(f"settings file {path} line ")
    assert message.endswith(": not valid YAML")


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    assert load_error(tmp_path, "- server\n- port\n") == (
        f"settings file {path}: expected a mapping at the top level")


def test_a_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tmp_path / "missing.yaml", env={})
    assert str(caught.value) == f"settings file {tmp_path / 'missing.yaml'}: cannot read (No such file or directory)"


def test_openai_api_key_with_commas_forms_the_server_pool(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  api_keys: [sk-from-file]\n")
    settings = load_settings(path, env={"OPENAI_API_KEY": "a, b"})
    assert settings.upstream.api_keys == ("a", "b")
    assert settings.pool_provider == "openai"


def test_secrets_from_the_environment_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({
        "upstream": {"base_url": "https://file.example/v1", "baixing_key": "bx-file", "model": "gpt-4o"},
        "admin": {"token": "admin-file-0123456789"},
    }))
    settings = load_settings(path, env={"OPENAI_BASE_URL": "http://env.example:8000/v1",
                                        "CHATGPT_ADMIN_TOKEN": "admin-env-0123456789", "BAIXING_API_KEY": "bx-env"})
    assert settings.upstream == UpstreamSettings(base_url="http://env.example:8000/v1", baixing_key="bx-env",
                                                 model="gpt-4o")
    assert settings.admin == AdminSettings(token="admin-env-0123456789")


def test_a_bad_value_from_the_environment_names_the_variable_and_shows_the_value(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, "upstream:\n  base_url: https://file.example/v1\n"),
                      env={"OPENAI_BASE_URL": "api.deepseek.com/v1"})
    assert str(caught.value) == ("environment variable OPENAI_BASE_URL='api.deepseek.com/v1': expected an http:// "
                                 "or https:// URL (it sets upstream.base_url)")


def test_a_bad_value_from_the_file_still_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, "upstream:\n  answer_timeout: 0\n"), env={"OPENAI_BASE_URL": "https://x/v1"})
    assert str(caught.value) == "setting upstream.answer_timeout: expected a positive number"


def test_redis_url_comes_from_the_environment_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "state:\n  redis_url: redis://file:6379/0\n  redis_fail: closed\n")
    settings = load_settings(path, env={"REDIS_URL": " redis://:pw@env:6380/1 "})
    assert (settings.state.redis_url, settings.state.redis_fail) == ("redis://:pw@env:6380/1", "closed")
    assert load_settings(path, env={}).state.redis_url == "redis://file:6379/0"


def test_a_bad_redis_url_from_the_environment_is_refused_without_showing_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, ""), env={"REDIS_URL": "http://:secret-pw@h"})
    assert "REDIS_URL" in str(caught.value) and "secret-pw" not in str(caught.value)


def test_blank_environment_variables_leave_the_file_alone(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  api_keys: [sk-file]\nadmin:\n  token: admin-file-0123456789\n")
    settings = load_settings(path, env={"OPENAI_API_KEY": " ", "CHATGPT_ADMIN_TOKEN": "", "OPENAI_BASE_URL": ""})
    assert (settings.upstream.api_keys, settings.admin.token) == (("sk-file",), "admin-file-0123456789")
    assert settings.upstream.base_url == "https://api.openai.com/v1"


def test_secrets_from_the_environment_apply_when_the_file_has_empty_sections(tmp_path: Path) -> None:
    # An operator who comments out every line under `upstream:` and `admin:` leaves them null in YAML.
    path = write(tmp_path, "upstream:\n  # api_keys: []\nadmin:\n  # token: ''\n")
    settings = load_settings(path, env={"OPENAI_API_KEY": "sk-env", "CHATGPT_ADMIN_TOKEN": "admin-env-0123456789"})
    assert settings.upstream.api_keys == ("sk-env",)
    assert settings.admin.token == "admin-env-0123456789"


def test_the_repository_settings_file_is_the_defaults_but_for_its_upstreams_and_models() -> None:
    path = REPO / "settings.yaml"
    assert path.is_file(), "settings.yaml is part of the repository (DESIGN.md layout)"
    settings = load_settings(path, env={})
    assert dataclasses.replace(settings, upstreams=(), models=ModelsSettings(),
                               images=ImagesSettings()) == Settings()
    assert dataclasses.replace(settings.images, size="256x256") == ImagesSettings()  # gpt-image-1 draws 1024 and up
    assert [(e.name, e.api_keys_env, e.api_keys, e.images) for e in settings.upstreams] == [
        ("deepseek", "DEEPSEEK_API_KEY", (), False), ("pictures", "OPENAI_API_KEY", (), True)]
    assert settings.models == ModelsSettings("deepseek-chat", {"gpt-3.5-turbo": "deepseek-chat"}, "gpt-image-1")
    assert settings.pool_provider == "offline"  # no key set: the server still starts, answering offline


def test_the_repository_settings_file_lists_every_key() -> None:
    raw = yaml.safe_load((REPO / "settings.yaml").read_text(encoding="utf-8"))
    expected = {section.name: sorted(f.name for f in dataclasses.fields(getattr(Settings(), section.name)))
                for section in dataclasses.fields(Settings) if section.name != "upstreams"}
    # The shorthand's keys are documented in comments: the file uses `upstreams:`, which excludes them.
    expected["upstream"] = sorted(set(expected["upstream"]) - set(SHORTHAND_KEYS))
    entry_keys = sorted(f.name for f in dataclasses.fields(UpstreamEntry) if f.name != "api_keys")
    assert {name: sorted(values) for name, values in raw.items() if name != "upstreams"} == expected
    assert [sorted(entry) for entry in raw["upstreams"]] == [entry_keys, entry_keys]


def test_check_with_the_repository_settings_exits_zero_and_says_which_upstream_serves_what() -> None:
    result = run_cli("--check")
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("settings OK; provider: offline")
    assert lines[1:] == [
        "  upstream deepseek at api.deepseek.com serves deepseek-chat, deepseek-reasoner; keys: none "
        "(DEEPSEEK_API_KEY unset)",
        "  upstream pictures at api.openai.com serves gpt-4o-mini, gpt-image-1; draws pictures; keys: none "
        "(OPENAI_API_KEY unset)",
        "  models: default deepseek-chat, pictures gpt-image-1, aliases gpt-3.5-turbo -> deepseek-chat",
        "  warning: upstream deepseek: DEEPSEEK_API_KEY is not set, so its key pool is empty "
        "(callers' own keys still reach it)",
        "  warning: upstream pictures: OPENAI_API_KEY is not set, so its key pool is empty "
        "(callers' own keys still reach it)",
    ]


def test_check_with_an_unknown_key_exits_two_with_one_line_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  bogus: 1\n", "bad.yaml")
    result = run_cli("--check", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["chatgpt-api: setting server.bogus: unknown key"]
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_exits_two_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"chatgpt-api: settings file {path}: cannot read (No such file or directory)"]
    assert "Traceback" not in result.stderr


def test_a_port_flag_out_of_range_exits_two_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--check", "--port", "70000", "--config", str(write(tmp_path, "{}\n")))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["chatgpt-api: setting server.port: expected 1..65535"]


async def status_envelope(port: int, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Poll `//status` until the server answers (at most ~10 s), as the mini-program would call it."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, "the server exited before answering"
            try:
                async with session.get(f"http://127.0.0.1:{port}//status", allow_redirects=False) as response:
                    assert response.status == 200
                    return dict(await response.json())
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


async def serve_until_status(args: list[str], log_path: Path) -> tuple[dict[str, Any], int, int]:
    """Start `python app.py --port 0 *args` (stderr to `log_path`), read `//status` once, stop it
    with SIGTERM; the envelope, the exit code and the port the server bound."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--port", "0", *args],
                                   cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log)
        try:
            port = await started_port(process, log_path)
            body = await status_envelope(port, process)
        finally:
            process.terminate()
            try:
                returncode = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
    return body, returncode, port


async def test_the_server_starts_without_an_api_key_answers_and_stops_on_terminate(tmp_path: Path) -> None:
    config = write(tmp_path, json.dumps({
        "server": {"host": "127.0.0.1"},
        "images": {"folder": str(tmp_path / "images")},
        "state": {"file": str(tmp_path / "state.json")},
    }))
    log_path = tmp_path / "server.log"
    body, returncode, port = await serve_until_status(["--config", str(config)], log_path)
    assert set(body) == {"status", "msg", "timestamp", "state"}
    assert (body["status"], body["msg"], body["state"]) == ("000000", "SUCCESS", True)
    assert returncode == 0
    log_text = log_path.read_text(encoding="utf-8")
    assert f"chatgpt-api starting on http://127.0.0.1:{port}; provider: offline" in log_text
    assert "upstream default at api.openai.com serves gpt-3.5-turbo; draws pictures; keys: none" in log_text
    assert "Traceback" not in log_text
