"""Shared fixtures: the real app on loopback in front of a fake OpenAI upstream."""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from chatgpt.settings import Settings, load_settings
from tests.fake_openai import FakeOpenAI

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


def build_settings(tmp_path: Path, fake: FakeOpenAI | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings as an operator would write them (through the real loader), pointed at the fake."""
    raw: dict[str, Any] = {
        "upstream": {"base_url": fake.base_url if fake else "http://127.0.0.1:9/v1",  # type: ignore[attr-defined]
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
    async def start(**overrides: Any) -> TestClient:
        app: web.Application = create_app(build_settings(tmp_path, fake, overrides))
        return await aiohttp_client(app)  # TestServer cancels handlers on disconnect, as main() does

    return start


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    """The app on its test defaults, paying with SERVER_KEY at the fake upstream."""
    return await make_client()


def url(client: TestClient, path: str) -> str:
    """An absolute URL, so paths like `//status` reach the server exactly as the mini-program sends them."""
    return f"http://{client.host}:{client.port}{path}"


def ws_connect(client: TestClient, path: str = "//websocket", **kwargs: Any) -> Any:
    """Open the app's websocket at `path` (double slash by default, as the mini-program does)."""
    return client.session.ws_connect(url(client, path), **kwargs)
