"""The websocket's edge (PROTOCOL.md E.3): caps per address and in total, idle and stalled clients,
aborted handshakes, and the cap on one answer's size."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.keys import sockets_key
from chatgpt.server.logs import quiet_bad_requests
from tests.conftest import MakeClient, ws_connect
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer

HANDSHAKE = ("GET /websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")


def handshake(forwarded_for: str | None = None) -> bytes:
    """A websocket upgrade request as a browser writes it (optionally through the trusted proxy)."""
    return HANDSHAKE.format(extra=f"X-Real-IP: {forwarded_for}\r\n" if forwarded_for else "").encode()


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask, RFC 6455 5.3)."""
    payload = text.encode()
    head = bytes([0x81])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> float:
    """Poll until `condition()` holds; the seconds it took (fails past `seconds`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


async def heartbeat(ws: aiohttp.ClientWebSocketResponse) -> None:
    """One ping answered by one pong."""
    await ws.send_json({"heart": "ping"})
    frame = await asyncio.wait_for(ws.receive_json(), 5)
    assert frame["heart"] == "pong"


async def refused_status(client: TestClient, real_ip: str) -> int:
    """The HTTP status of a websocket upgrade the server refuses (through the trusted loopback proxy)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_connect(client, headers={"X-Real-IP": real_ip})
    return refused.value.status


# --- caps per address and in total ------------------------------------------------------------------------------

async def test_over_the_per_address_cap_the_upgrade_is_refused_with_503_and_other_addresses_still_connect(
        make_client: MakeClient) -> None:
    client = await make_client(ws={"max_sockets_per_ip": 2, "max_sockets": 100})
    first = [await ws_connect(client, headers={"X-Real-IP": "203.0.113.7"}) for _ in range(2)]
    assert await refused_status(client, "203.0.113.7") == 503
    async with ws_connect(client, headers={"X-Real-IP": "203.0.113.8"}) as other:
        await heartbeat(other)
    for ws in first:
        await heartbeat(ws)  # the refusal touched none of the sockets already open
    await first[0].close()
    sockets = client.app[sockets_key]
    await wait_until(lambda: sockets.count("203.0.113.7") == 1)
    async with ws_connect(client, headers={"X-Real-IP": "203.0.113.7"}) as again:  # a place is free again
        await heartbeat(again)
    await first[1].close()


async def test_over_the_total_cap_every_new_upgrade_is_refused_with_503(make_client: MakeClient) -> None:
    client = await make_client(ws={"max_sockets_per_ip": 5, "max_sockets": 3})
    held = [await ws_connect(client, headers={"X-Real-IP": f"198.51.100.{n}"}) for n in range(3)]
    assert await refused_status(client, "198.51.100.99") == 503
    for ws in held:
        await ws.close()
    await wait_until(lambda: len(client.app[sockets_key]) == 0)
    async with ws_connect(client, headers={"X-Real-IP": "198.51.100.99"}) as ws:
        await heartbeat(ws)


async def test_a_refused_upgrade_gets_a_plain_503_before_any_handshake(make_client: MakeClient) -> None:
    client = await make_client(ws={"max_sockets_per_ip": 1})
    async with ws_connect(client):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(handshake())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    status_line, *headers = head.decode().split("\r\n")
    assert status_line.startswith("HTTP/1.1 503 ")
    assert not any(h.lower().startswith(("upgrade:", "sec-websocket-accept:")) for h in headers)


# --- idle and stalled clients -----------------------------------------------------------------------------------

async def test_a_socket_that_sends_nothing_for_idle_seconds_is_closed_with_1000(make_client: MakeClient) -> None:
    client = await make_client(ws={"idle_seconds": 0.3})
    async with ws_connect(client) as ws:
        message = await asyncio.wait_for(ws.receive(), 10)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1000)
    await wait_until(lambda: len(client.app[sockets_key]) == 0)


async def test_heartbeats_keep_a_socket_open_past_idle_seconds(make_client: MakeClient) -> None:
    client = await make_client(ws={"idle_seconds": 0.5})
    async with ws_connect(client) as ws:
        for _ in range(10):  # 1 s of heartbeats every 0.1 s: twice the idle time
            await heartbeat(ws)
            await asyncio.sleep(0.1)
        await heartbeat(ws)
        assert not ws.closed


async def test_a_client_that_stops_reading_is_cut_off_and_the_close_does_not_wait_on_the_full_buffer(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    # A long answer of ever longer cumulative frames; the client reads nothing after its question.
    fake.default = Stream(pieces=["x" * 200] * 4000, delay=0.005)
    # No byte budget: the frames must outgrow every buffer on the way while the test waits.
    client = await make_client(ws={"stall_seconds": 0.5, "close_seconds": 0.5, "max_answer_chars": 10_000_000,
                                   "bytes_per_second": 0}, quota={"daily_questions": 100})
    sockets = client.app[sockets_key]
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(raw, (client.host, client.port))
        await loop.sock_sendall(raw, handshake())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await asyncio.wait_for(loop.sock_recv(raw, 1), 5)  # byte by byte: nothing past the head
        assert head.startswith(b"HTTP/1.1 101 ")
        await loop.sock_sendall(raw, masked_text_frame(json.dumps(question("a very long story"))))
        await wait_until(lambda: len(fake.chat_requests()) == 1)
        seconds = await wait_until(lambda: len(sockets) == 0, 15)  # stall (0.5 s) + close (0.5 s) + margin
        await asyncio.wait_for(fake.disconnected.wait(), 5)  # and the answer nobody reads is no longer paid for
    finally:
        raw.close()
    assert seconds < 5, f"the stalled client was held {seconds:.1f} s"
    assert fake.disconnects == 1


async def test_a_client_that_reads_slowly_is_not_cut_off(make_client: MakeClient, fake: FakeOpenAI) -> None:
    fake.default = Stream(pieces=["y" * 100] * 40, delay=0.01)
    client = await make_client(ws={"stall_seconds": 0.5})
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = []
        while not frames or not frames[-1].get("isDone"):
            frames.append(await asyncio.wait_for(ws.receive_json(), 5))
            await asyncio.sleep(0.02)  # a slow reader still reads
    assert frames[-1]["content"] == "DONE"
    assert len(frames[-2]["content"]) == 4000


# --- aborted handshakes -----------------------------------------------------------------------------------------

async def test_aborted_handshakes_and_resets_log_no_error_and_release_their_place(
        make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(ws={"max_sockets_per_ip": 3})
    caplog.set_level(logging.DEBUG)
    for n in range(12):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        request = handshake()
        if n % 3 == 0:
            writer.write(request[:40])  # half a request line, then gone
        else:
            writer.write(request)  # a whole upgrade request, then gone before the answer
        await writer.drain()
        if n % 3 == 2:  # gone with a reset instead of a FIN
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
    sockets = client.app[sockets_key]
    await wait_until(lambda: sockets.count("127.0.0.1") == 0 and len(sockets) == 0)
    await asyncio.sleep(0.2)  # let any late handler failure reach the log
    async with ws_connect(client) as ws:  # 12 aborted handshakes, a cap of 3: the places were given back
        await heartbeat(ws)
    assert errors(caplog) == []


# --- one answer's size ------------------------------------------------------------------------------------------

async def test_an_answer_longer_than_max_answer_chars_ends_with_an_error_frame_and_the_upstream_is_closed(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    fake.default = Stream(pieces=["abcde"] * 200, delay=0.01)
    client = await make_client(ws={"max_answer_chars": 12})
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
        await asyncio.wait_for(fake.disconnected.wait(), 5)
        await heartbeat(ws)  # the socket stays open for the next question
    texts_sent: list[Any] = [f["content"] for f in frames[:-1]]
    assert texts_sent[-1] == "abcde" * 2  # never more than the cap
    assert all(len(t) <= 12 for t in texts_sent)
    end = frames[-1]
    assert (end["content"], end["isDone"], end["isSuccess"], end["conversationId"]) == (
        texts.ANSWER_TOO_LONG, True, False, "c-1")
    assert fake.disconnects == 1


def test_a_connection_reset_reaching_aiohttps_log_becomes_one_info_line_without_traceback() -> None:
    quiet_bad_requests()
    server_log = logging.getLogger("aiohttp.server")
    try:
        raise ConnectionResetError("Cannot write to closing transport")
    except ConnectionResetError:
        record = server_log.makeRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                       ("127.0.0.1",), sys.exc_info())
    assert all(f.filter(record) for f in server_log.filters)
    assert (record.levelno, record.exc_info, record.getMessage()) == (
        logging.INFO, None, "a client left mid-request: ConnectionResetError")
