"""Shutdown and restart (issue 7) with the real process: `python app.py` in a scratch folder, no key in
its environment, in front of a fake upstream served from this test on loopback."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatgpt.domain import texts
from tests.conftest import CLIENT_TOKEN, SERVER_KEY
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.capture import SecretCapture
from tests.helpers.servers import started_port, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "adm-lifecycle-token-8642"
SECRET_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATGPT_ADMIN_TOKEN", "BAIXING_API_KEY")
IDENTITY = "127.0.0.1"
START_SECONDS = 10.0
STOP_SECONDS = 10.0
KILLS = 10
BIG_PROMPT = 200_000
BIG_CONVERSATIONS = 5
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Server:
    """One `python app.py` process."""

    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        """What the process has logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


class Servers:
    """Starts server processes in one folder; kills any still running at the end, keeps their logs."""

    def __init__(self, folder: Path, capture: SecretCapture) -> None:
        self.folder = folder
        self.capture = capture
        self.started: list[Server] = []

    def write_settings(self, upstream_url: str, **sections: dict[str, Any]) -> Path:
        """Settings as an operator writes them; relative state and image paths land in the folder."""
        raw: dict[str, Any] = {
            "server": {"host": "127.0.0.1"},
            "upstream": {"base_url": upstream_url, "api_keys": [SERVER_KEY], "connect_timeout": 2, "read_timeout": 30},
            "limits": {"http_per_second": 1000},
            "ws": {"frame_interval_ms": 0},
            "state": {"file": "state.json"},
            "images": {"folder": "static"},
            "admin": {"token": ADMIN_TOKEN},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        path = self.folder / "settings.yaml"
        path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is valid YAML
        return path

    async def start(self, settings: Path) -> Server:
        """Start the process and wait until `//status` answers."""
        env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
        log = self.folder / f"server-{len(self.started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--config", str(settings),
                                        "--port", "0"], cwd=self.folder, env=env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        server = Server(process, "", log)  # kept before the port is known: a failed start is still cleaned up
        self.started.append(server)
        server.base = f"http://127.0.0.1:{await started_port(process, log, START_SECONDS)}"
        await wait_until_serving(process, server.base, server.output, START_SECONDS)
        return server

    def close(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
            self.capture.add_lines(server.output())  # for the session-wide secrets check


@pytest.fixture
def servers(tmp_path: Path, secret_capture: SecretCapture) -> Iterator[Servers]:
    """A factory of real server processes working in tmp_path."""
    secret_capture.add_secret(ADMIN_TOKEN, "tests/test_lifecycle.py")
    started = Servers(tmp_path, secret_capture)
    yield started
    started.close()


def demo_question(cid: str) -> dict[str, Any]:
    """An anonymous chat question from the mini-program."""
    return {"conversationId": cid, "id": f"u-{cid}", "authType": "api", "authValue": "Bearer ", "isDemo": True,
            "content": "", "messages": [{"role": "user", "content": f"tell me a long story ({cid})"}]}


async def until_first_text(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The first text frame of an answer (the answer is now in flight)."""
    while True:
        frame = await asyncio.wait_for(ws.receive_json(), 10)
        assert frame.get("isSuccess") is True, frame
        if frame.get("content"):
            return dict(frame)


async def rest_of_socket(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[Any], int | None]:
    """Every JSON frame until the socket closes, and the code of the close frame (None: no close frame).
    The code is read from the frame itself: the server may close the TCP connection right after it, so
    the client's own close reply can fail and its `close_code` then says 1006."""
    frames: list[Any] = []
    while True:
        message = await asyncio.wait_for(ws.receive(), STOP_SECONDS)
        if message.type == aiohttp.WSMsgType.TEXT:
            frames.append(json.loads(message.data))
        elif message.type == aiohttp.WSMsgType.CLOSE:
            return frames, int(message.data)
        elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return frames, None


async def rest_of_stream(response: aiohttp.ClientResponse) -> tuple[bytes, str | None]:
    """The remaining body of a streamed answer, and how it broke off (None when it ended properly)."""
    body = b""
    try:
        async for chunk in response.content.iter_any():
            body += chunk
    except aiohttp.ClientPayloadError as exc:
        return body, type(exc).__name__
    return body, None


def last_sse_payload(body: bytes) -> Any:
    """The last `data:` payload of an SSE body."""
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events, body[-300:]
    data = events[-1].removeprefix(b"data: ").decode()
    return data if data == "[DONE]" else json.loads(data)


@dataclass
class Stopped:
    """What the clients saw when the server was sent SIGTERM mid-answer, and how it exited."""

    socket_frames: list[list[Any]]
    close_codes: list[int | None]
    stream_rest: bytes | None  # the rest of the streamed /v1 answer, if one was in flight
    stream_broke: str | None  # how that stream broke off (None: it ended properly)
    code: int
    seconds: float
    output: str
    state: dict[str, Any]


async def sigterm_mid_answer(servers: Servers, fake: FakeOpenAI, capture: SecretCapture, *, v1: bool) -> Stopped:
    """Three websockets (and a streamed /v1 answer when `v1`) mid-answer, then SIGTERM."""
    fake.default = Stream(pieces=[f"word{n} " for n in range(300)], delay=0.05)  # a 15 s answer
    server = await servers.start(servers.write_settings(fake.base_url))  # type: ignore[attr-defined]
    streamed = None
    async with aiohttp.ClientSession(**capture.session_kwargs()) as http:
        sockets = [await http.ws_connect(f"{server.base}//websocket") for _ in range(3)]
        for n, ws in enumerate(sockets):
            await ws.send_json(demo_question(f"c-{n}"))
        for ws in sockets:
            await until_first_text(ws)
        if v1:
            body = {"model": "gpt-3.5-turbo", "stream": True, "messages": [{"role": "user", "content": "a long one"}]}
            streamed = await http.post(f"{server.base}/v1/chat/completions", json=body)
            assert streamed.status == 200
            first = b""
            while b'"content": "' not in first.replace(b'"content": ""', b""):  # until some answer text
                first += await asyncio.wait_for(streamed.content.readuntil(b"\n\n"), 10)
            assert first.startswith(b"data: {")

        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        socket_ends = await asyncio.gather(*(rest_of_socket(ws) for ws in sockets))
        stream_rest, broke = await rest_of_stream(streamed) if streamed is not None else (None, None)
        code = await asyncio.to_thread(server.process.wait, STOP_SECONDS + 5)
        seconds = time.monotonic() - stopping
        socket_frames = [frames for frames, _ in socket_ends]
        close_codes = [code for _, code in socket_ends]
    state = json.loads((servers.folder / "state.json").read_text(encoding="utf-8"))
    return Stopped(socket_frames, close_codes, stream_rest, broke, code, seconds, server.output(), state)


def assert_sockets_ended(stopped: Stopped) -> None:
    """Every socket's question in flight got a final error frame saying the server restarts (PROTOCOL.md
    E.3), then the close 1001; no answer cut short claimed success."""
    for frames, close_code in zip(stopped.socket_frames, stopped.close_codes, strict=True):
        assert frames, "no final frame before the close"
        last = frames[-1]
        assert (last.get("content"), last.get("isDone"), last.get("isSuccess")) == (
            "服务器正在重启, 请稍后再试~", True, False), last
        assert close_code == 1001, close_code
        assert not any(f.get("content") == "DONE" for f in frames)


async def test_sigterm_ends_websocket_questions_with_an_error_frame_then_1001_writes_the_state_and_exits_0(
        servers: Servers, fake: FakeOpenAI, secret_capture: SecretCapture) -> None:
    stopped = await sigterm_mid_answer(servers, fake, secret_capture, v1=False)
    assert_sockets_ended(stopped)
    assert stopped.code == 0, stopped.output
    assert stopped.seconds < STOP_SECONDS
    assert "Traceback" not in stopped.output
    # Every upstream stream was cancelled, not left to run (and bill) after the clients were gone.
    assert fake.disconnects == 3
    assert stopped.state["version"] == 1
    assert set(stopped.state) >= {"flags", "quota", "chat", "keys"}
    # Three anonymous questions, each answered in part: all three are charged (PROTOCOL.md A.5).
    assert stopped.state["quota"]["used"] == {IDENTITY: 3}


async def test_sigterm_ends_a_streamed_v1_answer_with_an_error_event_and_exits_within_10_s(
        servers: Servers, fake: FakeOpenAI, secret_capture: SecretCapture) -> None:
    stopped = await sigterm_mid_answer(servers, fake, secret_capture, v1=True)
    assert_sockets_ended(stopped)
    assert stopped.code == 0, stopped.output
    assert "Traceback" not in stopped.output
    assert fake.disconnects == 4
    assert stopped.state["quota"]["used"] == {IDENTITY: 4}
    # The streamed answer ends like any failed stream: a last `error` event, then the end of the body.
    assert stopped.stream_broke is None, f"the /v1 stream was cut off ({stopped.stream_broke}) " \
                                         f"after {stopped.seconds:.1f} s instead of ending with an error event"
    last = last_sse_payload(stopped.stream_rest or b"")
    assert isinstance(last, dict) and set(last) == {"error"}, (stopped.stream_rest or b"")[-300:]
    assert stopped.seconds < STOP_SECONDS, f"the process took {stopped.seconds:.1f} s to exit"


async def patch_until_killed(base: str, acked: list[int], http: aiohttp.ClientSession, start: int) -> None:
    """PATCH the announcement with increasing numbers, one at a time, until the server dies."""
    n = start
    while True:
        n += 1
        try:
            async with http.patch(f"{base}/admin/runtime", headers=ADMIN,
                                  json={"announcement": f"seq {n:06d} " + "x" * 8000}) as response:
                assert response.status == 200, await response.text()
                await response.read()
        except (TimeoutError, aiohttp.ClientError):
            return
        acked.append(n)


def seq_of(state: dict[str, Any]) -> int:
    """The number in a saved announcement."""
    return int(state["flags"]["announcement"].split()[1])


async def test_sigkill_during_frequent_saves_never_corrupts_the_state_and_a_restart_restores_it(
        servers: Servers, fake: FakeOpenAI, tmp_path: Path, secret_capture: SecretCapture) -> None:
    # A big /chat memory makes each save slow enough (~1 MB, fsynced) for kills to land mid-write.
    settings = servers.write_settings(fake.base_url, upstream={"context_chars": BIG_PROMPT + 100},  # type: ignore[attr-defined]
                                      api={"client_tokens": [CLIENT_TOKEN]})
    state_path = tmp_path / "state.json"
    rng = random.Random(7)
    seq = 0
    leftovers: list[int] = []
    saved: dict[str, Any] = {}  # the state file as the last kill left it
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), **secret_capture.session_kwargs()) as http:
        server = await servers.start(settings)
        async with http.post(f"{server.base}/chat", json={"content": "remember: apple"}) as response:
            assert response.status == 200
            cid = response.headers["X-Conversation-Id"]
            first_answer = (await response.text()).strip()
        async with http.patch(f"{server.base}/admin/runtime", headers=ADMIN,
                              json={"demoLimit": 7, "demoChat": "kept|across restarts"}) as response:
            assert response.status == 200
        for n in range(BIG_CONVERSATIONS):  # a trusted client's questions: the quota is not touched
            async with http.post(f"{server.base}/chat", json={"content": f"{n} " + "y" * BIG_PROMPT},
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}) as response:
                assert response.status == 200
                await response.read()

        for round_ in range(KILLS):
            if round_:
                server = await servers.start(settings)
                async with http.get(f"{server.base}/admin/runtime", headers=ADMIN) as response:
                    restored = await response.json()
                assert restored["announcement"] == saved["flags"]["announcement"]
            acked: list[int] = []
            patcher = asyncio.create_task(patch_until_killed(server.base, acked, http, seq))
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            server.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(server.process.wait, 5)
            await patcher
            assert acked, "no save happened before the kill"
            text = state_path.read_text(encoding="utf-8")
            saved = json.loads(text)  # never torn, whatever instant the kill hit
            assert saved["version"] == 1
            # Acknowledged means written: the file holds the last acknowledged change or a newer one.
            assert acked[-1] <= seq_of(saved) <= acked[-1] + 1
            assert saved["quota"]["used"] == {IDENTITY: 1}
            assert saved["flags"]["demoLimit"] == 7 and saved["flags"]["demoChat"] == "kept|across restarts"
            assert cid in saved["chat"]
            seq = max(acked[-1], seq_of(saved)) + 1
            leftovers.append(len(list(tmp_path.glob(".state.json.*.tmp"))))

        server = await servers.start(settings)
        async with http.get(f"{server.base}/admin/runtime", headers=ADMIN) as response:
            flags = await response.json()
        async with http.ws_connect(f"{server.base}//websocket") as ws:
            await ws.send_json({**demo_question("q"), "messages": [{"role": "user", "content": texts.QUOTA_QUERY}]})
            remaining = await asyncio.wait_for(ws.receive_json(), 5)
        async with http.post(f"{server.base}/chat", json={"content": "and the second?", "conversationId": cid}) as r:
            assert r.status == 200
            await r.read()
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.wait, STOP_SECONDS)
    temps_after_clean_run = len(list(tmp_path.glob(".state.json.*.tmp")))
    print(f"state temp files after each SIGKILL: {leftovers}; after a clean restart and stop: {temps_after_clean_run}")

    assert flags["announcement"] == saved["flags"]["announcement"]
    assert (flags["demoLimit"], flags["demoChat"]) == (7, "kept|across restarts")
    assert remaining["content"] == "6"  # demoLimit 7, one question asked before the kills
    assert fake.chat_requests()[-1].body["messages"][-3:] == [
        {"role": "user", "content": "remember: apple"}, {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "and the second?"}]
    assert code == 0, server.output()
    assert all("Traceback" not in s.output() for s in servers.started)
    assert not list(tmp_path.glob("state.json.corrupt-*")), "a state file was found corrupt at a restart"
