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


# --- Secrets check (tests/test_secrets.py): every log line and every response the tests receive ---
# Appended as one block. The capture lives in `config.stash`, not in a module global, because this
# file is imported twice (as `conftest` by pytest and as `tests.conftest` by the test modules).

import logging  # noqa: E402
import re  # noqa: E402

from aiohttp import ClientResponse, ClientWebSocketResponse, WSMessage, WSMsgType  # noqa: E402
from aiohttp.connector import Connection  # noqa: E402
from aiohttp.streams import StreamReader  # noqa: E402
from aiohttp.test_utils import BaseTestServer  # noqa: E402

from chatgpt.keys import settings_key  # noqa: E402

ADMIN_SECRET_SOURCE = "admin.token"  # how an admin token found in an app's settings is labelled
MIN_SECRET_CHARS = 8  # shorter "secrets" (test tokens like "x") would match ordinary text by chance
CAPTURED_LOGGERS = {"chatgpt": logging.DEBUG, "aiohttp": logging.INFO}  # production logs at INFO


class _SecretLogHandler(logging.Handler):
    """Keeps every record, formatted as the production text format writes it (traceback included)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.NOTSET)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is kept raw rather than lost
            self.lines.append(f"{record.name}: {record.msg!r} {record.args!r}")


class _RecordingStreamReader(StreamReader):
    """A response body reader that copies every byte handed to its reader into the capture.

    `_read_nowait_chunk` is aiohttp's private primitive under every public read (`read`, `readany`,
    `readline`, `iter_*`, `readchunk`): hooking it sees a body exactly once, however it is read.
    `__slots__ = ()` keeps the layout so an existing reader can switch to this class."""

    __slots__ = ()
    sinks: dict[int, bytearray] = {}  # id(reader) → its body so far; every switched reader is registered

    def _read_nowait_chunk(self, n: int) -> bytes:
        data = super()._read_nowait_chunk(n)
        sink = self.sinks.get(id(self))
        if sink is not None:
            sink += data
        return data


class _CapturedResponse(ClientResponse):
    """Records the headers and (as it is read) the body of every HTTP answer."""

    capture: SecretCapture

    async def start(self, connection: Connection) -> ClientResponse:
        response = await super().start(connection)
        self.capture.add_body("\n".join(f"{k}: {v}" for k, v in self.headers.items()).encode())
        if type(self.content) is StreamReader:  # not the shared EmptyStreamReader of a body-less answer
            self._capture_body = self.capture.add_body(b"")  # the response keeps its reader (and id) alive
            _RecordingStreamReader.sinks[id(self.content)] = self._capture_body
            self.content.__class__ = _RecordingStreamReader
        return response


class _CapturedWebSocket(ClientWebSocketResponse):
    """Records every frame (and close reason) the client receives."""

    capture: SecretCapture

    async def receive(self, timeout: float | None = None) -> WSMessage:  # type: ignore[override]
        message = await super().receive(timeout)
        if message.type is WSMsgType.TEXT:
            self.capture.add_body(message.data.encode())
        elif message.type is WSMsgType.BINARY:
            self.capture.add_body(bytes(message.data))
        elif message.type is WSMsgType.CLOSE and message.extra:
            self.capture.add_body(str(message.extra).encode())
        return message


class _CapturingTestClient(TestClient):  # type: ignore[type-arg]
    """A TestClient whose session records answers, and whose app's secrets join the list to look for."""

    capture: SecretCapture

    def __init__(self, server: BaseTestServer, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", self.capture.response_class)
        kwargs.setdefault("ws_response_class", self.capture.ws_response_class)
        super().__init__(server, **kwargs)
        app = getattr(server, "app", None)
        if isinstance(app, web.Application):
            self.capture.add_settings(app.get(settings_key))


class SecretCapture:
    """Log lines and response bytes the tests saw, and the secrets that must never be among them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bodies: list[bytearray] = []
        self.secrets: dict[str, set[str]] = {}  # secret → where the tests got it from
        self.handler = _SecretLogHandler(self.lines)
        self.response_class = type("CapturedResponse", (_CapturedResponse,), {"capture": self})
        self.ws_response_class = type("CapturedWebSocket", (_CapturedWebSocket,), {"capture": self})
        self.client_class: type[TestClient] = type(  # type: ignore[type-arg]
            "CapturingTestClient", (_CapturingTestClient,), {"capture": self})

    def add_secret(self, value: object, source: str) -> None:
        """Look for `value` too (ignored unless a string of at least MIN_SECRET_CHARS)."""
        if isinstance(value, str) and len(value.strip()) >= MIN_SECRET_CHARS:
            self.secrets.setdefault(value.strip(), set()).add(source)

    def add_settings(self, settings: object) -> None:
        """Every credential in an app's Settings: server keys, admin token, client tokens, Baixing key, WeChat."""
        if not isinstance(settings, Settings):
            return
        for entry in settings.upstream_entries:  # the `upstream:` shorthand's keys are the "default" upstream's
            for key in entry.api_keys:
                self.add_secret(key, f"upstream {entry.name} api_keys")
        self.add_secret(settings.upstream.baixing_key, "upstream.baixing_key")
        self.add_secret(settings.admin.token, ADMIN_SECRET_SOURCE)
        for token in settings.api.client_tokens:
            self.add_secret(token, "api.client_tokens")
        self.add_secret(settings.wechat.secret, "wechat.secret")
        self.add_secret(settings.wechat.token_secret, "wechat.token_secret")

    def add_lines(self, text: str) -> None:
        """Log lines from elsewhere, e.g. a server subprocess's output."""
        self.lines.extend(text.splitlines())

    def add_body(self, data: bytes) -> bytearray:
        """A response body (or frame); the returned buffer may keep growing as the body is read."""
        body = bytearray(data)
        self.bodies.append(body)
        return body

    def session_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make a plain `aiohttp.ClientSession` record what it receives."""
        return {"response_class": self.response_class, "ws_response_class": self.ws_response_class}

    def checked(self) -> tuple[int, int, int]:
        """How many log lines, responses and response bytes have been captured so far."""
        return len(self.lines), len(self.bodies), sum(len(b) for b in self.bodies)

    def leaks(self) -> list[str]:
        """One line per secret found in a log line or a response, the secret itself masked."""
        found = []
        for secret, sources in sorted(self.secrets.items()):
            shown = f"{secret[:3]}…{secret[-2:]} ({', '.join(sorted(sources))})"
            for number, line in enumerate(self.lines):
                if secret in line:
                    found.append(f"{shown} in log line {number}: {line.replace(secret, '<SECRET>')[:300]}")
            needle = secret.encode()
            for number, body in enumerate(self.bodies):
                if needle in body:
                    at = body.find(needle)
                    context = bytes(body[max(0, at - 120):at + len(needle) + 120]).replace(needle, b"<SECRET>")
                    found.append(f"{shown} in response {number}: {context.decode(errors='replace')}")
        return found


_SECRET_CAPTURE = pytest.StashKey[SecretCapture]()
_LOGGER_LEVELS = pytest.StashKey[dict[str, int]]()
_TEST_SECRET = re.compile(r"""["'](sk-[A-Za-z0-9_-]{6,})["']|^\w*TOKEN\w*\s*=\s*["']([^"']+)["']""", re.M)


def _secrets_in_test_sources(capture: SecretCapture) -> None:
    """Keys (`"sk-…"`) and `…TOKEN… = "…"` constants written in the test files, used or not."""
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for match in _TEST_SECRET.finditer(path.read_text(encoding="utf-8")):
            capture.add_secret(match.group(1) or match.group(2), path.name)


@pytest.hookimpl(specname="pytest_configure")
def pytest_configure_secret_capture(config: pytest.Config) -> None:
    """Attach the session's log handler before anything runs, and let app loggers speak at INFO and below."""
    config.addinivalue_line("markers", "run_last: run after every other collected test (the secrets check)")
    capture = SecretCapture()
    for name, value in (("SERVER_KEY", SERVER_KEY), ("USER_KEY", USER_KEY), ("CLIENT_TOKEN", CLIENT_TOKEN)):
        capture.add_secret(value, name)
    _secrets_in_test_sources(capture)
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
