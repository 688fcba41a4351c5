"""Shared fixtures: the real app on loopback in front of a fake OpenAI upstream."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import settings as hypothesis_settings
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from chatgpt.settings import Settings, load_settings
from tests.fakes.openai import FakeOpenAI
from tests.fakes.wechat import FakeWeChat, fake_secrets, start_fake_wechat
from tests.helpers.capture import CAPTURED_LOGGERS, SecretCapture, secrets_in_test_sources
from tests.helpers.servers import refusing_port
from tests.helpers.timewarp import WarpLoop

# Property tests explore new examples on every run; `HYPOTHESIS_PROFILE=ci` (set by .ci/run) runs the
# same examples every time, so that a case a test has never met fails a developer's run, not a landing.
hypothesis_settings.register_profile("ci", derandomize=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SERVER_KEY = "sk-server-key-0001"
USER_KEY = "sk-user-own-key-9999"
CLIENT_TOKEN = "client-token-abcdef"

MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeOpenAI:
    """A running fake upstream; its base URL is `fake.base_url`."""
    upstream = FakeOpenAI()
    server = await aiohttp_server(upstream.app)
    upstream.base_url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return upstream



@pytest.fixture
async def wechat(aiohttp_server: Callable[..., Awaitable[TestServer]],
                 secret_capture: SecretCapture) -> AsyncIterator[FakeWeChat]:
    """A running fake WeChat; its secret, session keys and access tokens join the secrets check."""
    fake = await start_fake_wechat(aiohttp_server)
    yield fake
    for value in fake_secrets(fake):
        secret_capture.add_secret(value, "fake WeChat")


def build_settings(tmp_path: Path, fake: FakeOpenAI | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings as an operator would write them (through the real loader), pointed at the fake."""
    raw: dict[str, Any] = {
        "upstream": {"base_url": fake.base_url if fake else f"http://127.0.0.1:{refusing_port()}/v1",  # type: ignore[attr-defined]
                     "api_keys": [SERVER_KEY], "connect_timeout": 2, "read_timeout": 5},
        "ws": {"frame_interval_ms": 0},
        "images": {"folder": str(tmp_path / "images")},
        "state": {"file": str(tmp_path / "state.json")},
        "api": {"client_tokens": [CLIENT_TOKEN]},
    }
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "settings.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is valid YAML
    return load_settings(path, env={})


@pytest.fixture
async def make_client(aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path,
                      fake: FakeOpenAI) -> MakeClient:
    """Start the real app with settings overrides, e.g. `await make_client(quota={"daily_questions": 2})`."""
    started = 0

    async def start(**overrides: Any) -> TestClient:
        nonlocal started
        started += 1
        if started > 1 and "file" not in (overrides.get("state") or {}):
            # The apps of one test run side by side: each needs its own state file (its lock refuses two).
            overrides["state"] = {**(overrides.get("state") or {}), "file": str(tmp_path / f"state-{started}.json")}
        app: web.Application = create_app(build_settings(tmp_path, fake, overrides))
        return await aiohttp_client(app)  # TestServer cancels handlers on disconnect, as main() does

    return start


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    """The app on its test defaults, paying with SERVER_KEY at the fake upstream."""
    return await make_client()


@pytest.hookimpl(specname="pytest_asyncio_loop_factories")
def pytest_asyncio_loop_factories_warp(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """The event loop of each async test: a module that sets `EVENT_LOOP = "warp"` gets a loop whose clock
    its tests move forward instead of sleeping (tests/timewarp.py); every other test the stock loop."""
    module = getattr(item, "module", None)
    if getattr(module, "EVENT_LOOP", None) == "warp":
        return {"warp": WarpLoop}
    return {"asyncio": asyncio.new_event_loop}


def url(client: TestClient, path: str) -> str:
    """An absolute URL, so paths like `//status` reach the server exactly as the mini-program sends them."""
    return f"http://{client.host}:{client.port}{path}"


def ws_connect(client: TestClient, path: str = "//websocket", **kwargs: Any) -> Any:
    """Open the app's websocket at `path` (double slash by default, as the mini-program does)."""
    return client.session.ws_connect(url(client, path), **kwargs)


# --- Secrets check (tests/test_secrets.py, the harness in tests/helpers/capture.py) ---
# The capture lives in `config.stash`, not in a module global, because this file is imported twice
# (as `conftest` by pytest and as `tests.conftest` by the test modules).

_SECRET_CAPTURE = pytest.StashKey[SecretCapture]()
_LOGGER_LEVELS = pytest.StashKey[dict[str, int]]()


@pytest.hookimpl(specname="pytest_configure")
def pytest_configure_secret_capture(config: pytest.Config) -> None:
    """Attach the session's log handler before anything runs, and let app loggers speak at INFO and below."""
    config.addinivalue_line("markers", "run_last: run after every other collected test (the secrets check)")
    capture = SecretCapture()
    for name, value in (("SERVER_KEY", SERVER_KEY), ("USER_KEY", USER_KEY), ("CLIENT_TOKEN", CLIENT_TOKEN)):
        capture.add_secret(value, name)
    secrets_in_test_sources(capture)
    config.stash[_SECRET_CAPTURE] = capture
    config.stash[_LOGGER_LEVELS] = {name: logging.getLogger(name).level for name in CAPTURED_LOGGERS}
    for name, level in CAPTURED_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().addHandler(capture.handler)


@pytest.hookimpl(specname="pytest_unconfigure")
def pytest_unconfigure_secret_capture(config: pytest.Config) -> None:
    capture = config.stash.get(_SECRET_CAPTURE, None)
    if capture is not None:
        logging.getLogger().removeHandler(capture.handler)
    for name, level in config.stash.get(_LOGGER_LEVELS, {}).items():
        logging.getLogger(name).setLevel(level)


@pytest.hookimpl(specname="pytest_collection_modifyitems", trylast=True)
def pytest_collection_modifyitems_run_last(items: list[pytest.Item]) -> None:
    """Tests marked `run_last` (the secrets check) move to the end, keeping their relative order."""
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)  # a stable sort


@pytest.hookimpl(specname="pytest_terminal_summary")
def pytest_terminal_summary_secrets(terminalreporter: Any, config: pytest.Config) -> None:
    """Say how much was checked, and re-check what arrived after the last test."""
    capture = config.stash.get(_SECRET_CAPTURE, None)
    if capture is None:
        return
    lines, responses, size = capture.checked()
    leaks = capture.leaks()
    terminalreporter.write_line(
        f"secrets check: {len(capture.secrets)} secrets looked for in {lines} log lines and "
        f"{responses} responses ({size} bytes): {len(leaks)} found", red=bool(leaks), green=not leaks)
    for leak in leaks[:20]:
        terminalreporter.write_line(f"  {leak}", red=True)


@pytest.fixture
def aiohttp_client_cls(request: pytest.FixtureRequest) -> type[TestClient]:  # type: ignore[type-arg]
    """Every `aiohttp_client` (hence `make_client`) records what it receives for the secrets check."""
    return request.config.stash[_SECRET_CAPTURE].client_class


@pytest.fixture
def secret_capture(request: pytest.FixtureRequest) -> SecretCapture:
    """The session's capture: add subprocess logs, extra secrets, or use its ClientSession kwargs."""
    return request.config.stash[_SECRET_CAPTURE]


@pytest.hookimpl(specname="pytest_sessionfinish")
def pytest_sessionfinish_secrets(session: pytest.Session) -> None:
    """A secret that reached a log or a response after the last test still fails the run."""
    capture = session.config.stash.get(_SECRET_CAPTURE, None)
    if capture is not None and capture.leaks() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
