"""Closed-loop clients for the capacity benchmark: `/v1` SSE and mini-program websockets.

Each client asks again as soon as its answer ends. Every received piece is timed against the
send-time stamp of the newest token it carries (bench/stamps.py): for `/v1` a piece is one
network read holding at least one complete token event; for the websocket it is one text frame
(the whole answer so far, PROTOCOL.md A.3), whose `content` ends with the newest token.

The clients are bare asyncio protocols, not aiohttp: the load shares one core with the paced
upstream, and a protocol callback that parses a read in place costs a fraction of a task wake-up
through aiohttp's stream reader, so the load side saturates well after the server does. They
speak what the servers need: HTTP/1.1 keep-alive with chunked or sized bodies, and RFC 6455
client frames (masked, with the all-zero mask key: legal, and XOR with it is a copy) without
compression, as the mini-program offers none. Each client sends its own `X-Forwarded-For`
address (loopback is a trusted proxy), so per-address limits and quotas apply per client as in
production behind nginx.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
from collections.abc import Callable
from typing import Any

from stamps import Histogram, age_ms, now_ns

STAMP_AFTER_CONTENT = re.compile(rb'(\d{6})"')  # the first stamp+quote after `"content":` ends the token
SMALL_FRAME = 1024  # frames up to this size are parsed as JSON; bigger ones (text so far) are scanned
CONNECT_TIMEOUT = 10.0


def client_address(n: int) -> str:
    """A distinct client address per client, sent as X-Forwarded-For."""
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def question_frame(client: int, n: int) -> bytes:
    """The mini-program's chat question (PROTOCOL.md A.3) from an anonymous (demo-mode) user:
    the server's key pool pays under the daily quota, which the benchmark's settings raise."""
    prompt = "Say something."
    return json.dumps({
        "conversationId": f"c-{client}", "id": f"u-{client}-{n}", "parentId": 1, "authType": "api",
        "authValue": "Bearer ", "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
        "messages": [{"role": "user", "content": prompt, "html": f"<p>{prompt}</p>", "isSend": True,
                      "createTime": "2026-11-24 08:00:00", "id": f"u-{client}-{n}"}],
    }, ensure_ascii=False).encode()


V1_BODY = json.dumps({"model": "gpt-3.5-turbo", "stream": True,
                      "messages": [{"role": "user", "content": "Say something."}]}).encode()


class Recorder:
    """What every client saw while the measured window is open (`on`)."""

    def __init__(self) -> None:
        self.on = False
        self.errors_any = 0  # every error, in a window or not (never reset): ramps can fail too
        self.last_error: str | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the previous window."""
        self.delay = Histogram()  # ms from a token's send time to the piece that delivered it
        self.ttft: list[float] = []  # ms from asking to the first token
        self.answers = 0
        self.errors = 0
        self.error_sample: str | None = None
        self.bytes = 0  # of answers completed in the window
        self.frames = 0  # of answers completed in the window
        self.tokens = 0  # token events seen (/v1 only; a websocket frame holds all text so far)

    def piece(self, stamp: int, now: int) -> None:
        """One received piece whose newest token carries `stamp`."""
        if self.on:
            self.delay.add(age_ms(stamp, now))

    def first_token(self, asked: int, now: int) -> None:
        if self.on:
            self.ttft.append((now - asked) / 1e6)

    def answer(self, size: int, frames: int) -> None:
        if self.on:
            self.answers += 1
            self.bytes += size
            self.frames += frames

    def error(self, text: str) -> None:
        self.errors_any += 1
        self.last_error = text[:300]
        if self.on:
            self.errors += 1
            if self.error_sample is None:
                self.error_sample = text[:300]


class Answer:
    """One question in flight: when it was asked, what arrived, and the future that ends it."""

    __slots__ = ("asked", "first", "size", "frames", "done", "future", "trace")

    def __init__(self, trace: list[tuple[int, int]] | None = None) -> None:
        self.asked = now_ns()
        self.first = False
        self.size = 0
        self.frames = 0
        self.done = False
        self.future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.trace = trace  # (receive ns, frame bytes) per frame, when asked for (the long answer)

    def finish(self, error: str | None) -> None:
        if not self.future.done():
            self.future.set_result(error)


class Client(asyncio.Protocol):
    """Connection plumbing shared by both kinds."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answer: Answer | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.fail(f"connection lost: {exc}" if exc else "connection closed by the server")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def fail(self, text: str) -> None:
        """End the current answer with an error (counted once)."""
        answer, self.answer = self.answer, None
        if answer is not None and not answer.future.done():
            self.recorder.error(text)
            answer.finish(text)

    def succeed(self) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.future.done():
            self.recorder.answer(answer.size, answer.frames)
            answer.finish(None)

    def got_stamp(self, answer: Answer, stamp: int, now: int) -> None:
        self.recorder.piece(stamp, now)
        if not answer.first:
            answer.first = True
            self.recorder.first_token(answer.asked, now)


# ---------------------------------------------------------------- /v1 SSE

class V1Client(Client):
    """Streamed `/v1/chat/completions` requests on one keep-alive connection."""

    def __init__(self, recorder: Recorder, host: str, path: str, address: str) -> None:
        super().__init__(recorder)
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Accept: text/event-stream\r\nX-Forwarded-For: {address}\r\n"
                        f"Content-Length: {len(V1_BODY)}\r\n\r\n").encode() + V1_BODY
        self._reset_response()

    def _reset_response(self) -> None:
        self.state = "head"  # head → chunk-size / chunk-data / chunk-end / trailer, or sized / until-close
        self.status = 0
        self.remaining = 0
        self.keep_alive = True
        self.sse = bytearray()
        self.done_seen = False
        self.error_body = bytearray()

    def ask(self) -> asyncio.Future[str | None]:
        """Send one request; the future ends with None (a whole answer) or an error text."""
        answer = self.answer = Answer()
        self._reset_response()
        if self.transport is None:
            self.fail("not connected")
        else:
            self.transport.write(self.request)
        return answer.future

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except ValueError as exc:  # a chunk size or status line that does not parse
            self.fail(f"malformed response: {exc}")
            self.close()

    def _receive(self, data: bytes) -> None:
        now = now_ns()
        answer = self.answer
        if answer is None:
            return  # nothing asked: ignore (the server would not send unasked)
        answer.size += len(data)
        newest = -1
        if self.state == "chunk-size" and not self.buffer and data.endswith(b"\r\n"):
            # The usual read: exactly one whole chunk. Parse it in place, no buffer copies.
            eol = data.find(b"\r\n")
            size = int(data[:eol].split(b";")[0], 16) if eol > 0 else -1
            if size > 0 and eol + 2 + size + 2 == len(data):
                newest = self._body(data[eol + 2:eol + 2 + size])
                if newest >= 0 and answer is self.answer:
                    answer.frames += 1
                    self.got_stamp(answer, newest, now)
                return
        self.buffer += data
        while self.buffer and answer is self.answer:
            state = self.state
            if state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(self.buffer[:end]).decode("latin-1"))
                del self.buffer[:end + 4]
            elif state == "chunk-size":
                eol = self.buffer.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(self.buffer[:eol]).split(b";")[0], 16)
                del self.buffer[:eol + 2]
                self.remaining = size
                self.state = "chunk-data" if size else "trailer"
            elif state in ("chunk-data", "sized"):
                take = min(self.remaining, len(self.buffer))
                newest = max(newest, self._body(bytes(self.buffer[:take])))
                del self.buffer[:take]
                self.remaining -= take
                if self.remaining == 0:
                    if state == "sized":
                        self._end()
                    else:
                        self.state = "chunk-end"
            elif state == "chunk-end":
                if len(self.buffer) < 2:
                    return
                del self.buffer[:2]
                self.state = "chunk-size"
            elif state == "trailer":
                eol = self.buffer.find(b"\r\n")
                if eol < 0:
                    return
                del self.buffer[:eol + 2]
                if eol == 0:
                    self._end()
            else:  # until-close
                newest = max(newest, self._body(bytes(self.buffer)))
                del self.buffer[:]
        if newest >= 0 and answer is not None:
            answer.frames += 1
            self.got_stamp(answer, newest, now)

    def _head(self, text: str) -> None:
        lines = text.split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep_alive = headers.get("connection") != "close"
        if "chunked" in headers.get("transfer-encoding", ""):
            self.state = "chunk-size"
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            self.state = "sized"
            if self.remaining == 0:
                self._end()
        else:
            self.state = "until-close"
            self.keep_alive = False

    def _body(self, data: bytes) -> int:
        """Take body bytes; returns the stamp of the newest token completed in them, or -1."""
        if self.status != 200:
            self.error_body += data[:300]
            return -1
        newest = -1
        event: bytes | None
        if not self.sse and data.endswith(b"\n\n") and data.find(b"\n\n") == len(data) - 2:
            event = data[:-2]  # the usual piece: one whole event
        else:
            self.sse += data
            event = None
        while True:
            if event is None:
                end = self.sse.find(b"\n\n")
                if end < 0:
                    return newest
                event = bytes(self.sse[:end])
                del self.sse[:end + 2]
            if event.startswith(b"data: [DONE]"):
                self.done_seen = True
            else:
                at = event.find(b'"content":"')
                if at >= 0:
                    match = STAMP_AFTER_CONTENT.search(event, at + 11)
                    if match:
                        newest = int(match.group(1))
                        self.recorder.tokens += self.recorder.on
                elif event.startswith(b'data: {"error"'):
                    self.fail("error event: " + event[:200].decode(errors="replace"))
                    return newest
            event = None
            if not self.sse:
                return newest

    def _end(self) -> None:
        """The response body is complete."""
        if not self.keep_alive:
            self.close()
        if self.status != 200:
            self.fail(f"HTTP {self.status}: {bytes(self.error_body).decode(errors='replace')}")
        elif not self.done_seen:
            self.fail("the stream ended without data: [DONE]")
        else:
            self.succeed()
        self.state = "head"


# ---------------------------------------------------------------- websocket

class WsClient(Client):
    """One mini-program socket: handshake, then questions one after another."""

    def __init__(self, recorder: Recorder, host: str, path: str, address: str, client: int) -> None:
        super().__init__(recorder)
        key = base64.b64encode(os.urandom(16)).decode()
        self.handshake = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                          f"X-Forwarded-For: {address}\r\n\r\n").encode()
        self.open: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.client = client
        self.asked = 0
        self.fragments = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.handshake)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_result(f"connection lost during the handshake: {exc}")
        super().connection_lost(exc)

    def send(self, opcode: int, payload: bytes) -> None:
        """A client frame: FIN, masked with the zero key (so the payload goes as is)."""
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        if self.transport is not None:
            self.transport.write(head + b"\0\0\0\0" + payload)

    def ask(self, trace: list[tuple[int, int]] | None = None) -> asyncio.Future[str | None]:
        """Send the next question; the future ends with None (done frame) or an error text."""
        answer = self.answer = Answer(trace)
        self.asked += 1
        if self.transport is None:
            self.fail("not connected")
        else:
            self.send(0x1, question_frame(self.client, self.asked))
        return answer.future

    def data_received(self, data: bytes) -> None:
        now = now_ns()
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:end]).split(b"\r\n", 1)[0]
            del self.buffer[:end + 4]
            if b" 101 " not in status + b" ":
                self.open.set_result(f"handshake refused: {status.decode(errors='replace')}")
                self.close()
                return
            self.upgraded = True
            self.open.set_result(None)
        buffer = self.buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            size = second & 0x7F
            start = 2
            if size == 126:
                if len(buffer) < 4:
                    return
                size = int.from_bytes(buffer[2:4], "big")
                start = 4
            elif size == 127:
                if len(buffer) < 10:
                    return
                size = int.from_bytes(buffer[2:10], "big")
                start = 10
            if second & 0x80:
                start += 4  # a server must not mask; tolerate it by skipping the key (payload would be masked)
            if len(buffer) < start + size:
                return
            payload = bytes(buffer[start:start + size])
            del buffer[:start + size]
            self._frame(first & 0x0F, bool(first & 0x80), payload, now)

    def _frame(self, opcode: int, fin: bool, payload: bytes, now: int) -> None:
        if opcode == 0x9:  # ping
            self.send(0xA, payload)
            return
        if opcode == 0x8:  # close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.fail(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
            self.close()
            return
        if opcode in (0x1, 0x2, 0x0):
            self.fragments += payload
            if not fin:
                return
            payload = bytes(self.fragments)
            self.fragments.clear()
            self._text(payload, now)

    def _text(self, payload: bytes, now: int) -> None:
        answer = self.answer
        if answer is None:
            return  # e.g. a pong; nothing is asked
        answer.size += len(payload)
        answer.frames += 1
        if answer.trace is not None:
            answer.trace.append((now, len(payload)))
        if len(payload) > SMALL_FRAME and b'"isDone":true' not in payload[-200:] \
                and b'"isDone": true' not in payload[-200:]:
            stamp = _stamp_of_big_frame(payload)
            if stamp is not None:
                self.got_stamp(answer, stamp, now)
                return
        try:
            frame = json.loads(payload)
        except ValueError:
            self.fail(f"a frame that is not JSON: {payload[:200]!r}")
            return
        if not isinstance(frame, dict):
            self.fail(f"a frame that is not an object: {payload[:200]!r}")
            return
        content = frame.get("content")
        if frame.get("isDone") is True:
            if frame.get("isSuccess") is False:
                self.fail(f"error frame: {str(content)[:200]}")
            else:
                self.succeed()
            return
        if "choices" in frame:  # the bare relay's websocket forwards upstream chunks as they are
            choices = frame.get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
        if isinstance(content, str) and len(content) >= 6 and content[-6:].isdigit():
            self.got_stamp(answer, int(content[-6:]), now)


def _stamp_of_big_frame(payload: bytes) -> int | None:
    """The stamp ending `content` in a text frame, found without parsing the frame: when `content`
    comes before `html` (as the project writes them), its closing quote is the last quote before
    `"html"`. A JSON string cannot hold `"html"` unescaped, so the first match is the key."""
    content = payload.find(b'"content"')
    html = payload.find(b'"html"', content)
    if content < 0 or html < 0:
        return None
    quote = payload.rfind(b'"', content, html)
    digits = payload[quote - 6:quote]
    return int(digits) if len(digits) == 6 and digits.isdigit() else None


# ---------------------------------------------------------------- the clients' loops

async def connect(factory: Callable[[], Client], host: str, port: int) -> Client:
    """A connected client (a websocket one once its handshake succeeded)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT):
        _, protocol = await loop.create_connection(factory, host, port)
        try:
            if isinstance(protocol, WsClient):
                refused = await asyncio.shield(protocol.open)
                if refused is not None:
                    raise ConnectionError(refused)
        except BaseException:
            protocol.close()
            raise
    return protocol


# asyncio.timeout rather than wait_for throughout: in Python 3.11 wait_for can swallow a
# cancellation that arrives as the awaited answer completes, and a client would never stop.

async def client_loop(kind: str, n: int, host: str, port: int, path: str, recorder: Recorder,
                      delay: float, answer_timeout: float, stop: asyncio.Event) -> None:
    """Client `n`: wait `delay` s (spreads the clients' phases), then ask, read, ask again… until
    `stop` is set (or the task is cancelled)."""
    await asyncio.sleep(delay)
    address = client_address(n)
    authority = f"{host}:{port}"

    def factory() -> Client:
        if kind == "ws":
            return WsClient(recorder, authority, path, address, n)
        return V1Client(recorder, authority, path, address)

    client: Client | None = None
    try:
        while not stop.is_set():
            if client is None or client.closed:
                try:
                    client = await connect(factory, host, port)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    recorder.error(f"connect: {type(exc).__name__}: {exc}")
                    client = None
                    await asyncio.sleep(0.5)
                    continue
            assert isinstance(client, (WsClient, V1Client))
            future = client.ask()
            try:
                async with asyncio.timeout(answer_timeout):
                    error = await asyncio.shield(future)  # a timeout must not cancel the answer's future
            except TimeoutError:
                client.fail(f"no end of answer within {answer_timeout:.0f} s")
                error = "timeout"
            # After a failed /v1 answer the rest of its response may still come: start afresh. A
            # websocket error end frame leaves the socket usable, as the mini-program keeps it.
            if error is not None and (kind != "ws" or error == "timeout"):
                client.close()
                client = None
    finally:
        if client is not None:
            client.close()


async def one_ws_answer(host: str, port: int, path: str, timeout: float) -> dict[str, Any]:
    """One websocket question, timed frame by frame (the long-answer mode)."""
    recorder = Recorder()
    recorder.on = True
    client = await connect(lambda: WsClient(recorder, f"{host}:{port}", path, client_address(1), 1), host, port)
    assert isinstance(client, WsClient)
    trace: list[tuple[int, int]] = []
    started = now_ns()
    try:
        async with asyncio.timeout(timeout):
            error = await client.ask(trace)
    finally:
        client.close()
    return {"error": error, "started_ns": started, "trace": trace, "ttft": recorder.ttft,
            "delay": recorder.delay}


class LagMonitor:
    """How late this process's event loop wakes a 10 ms sleeper: the load side's own saturation."""

    def __init__(self) -> None:
        self.lag = Histogram()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            self.lag.add((loop.time() - before - 0.01) * 1000)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
