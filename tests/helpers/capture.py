"""The session-wide secrets check (tests/test_secrets.py): every log line and every response the tests
receive is kept, and no credential may appear in any of them. conftest.py attaches it to the session."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, ClientWebSocketResponse, WSMessage, WSMsgType, web
from aiohttp.connector import Connection
from aiohttp.streams import StreamReader
from aiohttp.test_utils import BaseTestServer, TestClient

from chatgpt.keys import settings_key
from chatgpt.settings import Settings

TESTS = Path(__file__).resolve().parent.parent

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


_TEST_SECRET = re.compile(r"""["'](sk-[A-Za-z0-9_-]{6,})["']|^\w*TOKEN\w*\s*=\s*["']([^"']+)["']""", re.M)


def secrets_in_test_sources(capture: SecretCapture) -> None:
    """Keys (`"sk-…"`) and `…TOKEN… = "…"` constants written in the test files, used or not."""
    for path in sorted(TESTS.rglob("*.py")):
        for match in _TEST_SECRET.finditer(path.read_text(encoding="utf-8")):
            capture.add_secret(match.group(1) or match.group(2), path.name)
