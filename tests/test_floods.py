"""Fault suite, floods: many spoofed addresses and many connections stay within the caps, and
legitimate clients are still served. Loopback only; each test bounded in time."""
from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from aiohttp import ClientWebSocketResponse
from aiohttp.test_utils import TestClient
from aiohttp.web import Server

from chatgpt.domain import texts
from chatgpt.keys import pipeline_key
from tests.conftest import MakeClient, url, ws_connect
from tests.helpers.frames import question, receive_answer, wait_until

LIMITER_CAP = 10_000  # LimiterTable's max_entries (not a setting): the most addresses it remembers
SPOOFED = 12_000  # more distinct addresses than the cap, so the cap is what bounds the table
CONNECTIONS = 5_000
KEEPALIVE_REQUEST = b"GET //status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def resident_bytes() -> int:
    """This process's resident memory now (the app runs in-process in these tests)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def spoofed(n: int) -> str:
    """The n-th distinct address in 10.0.0.0/8."""
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def server_of(client: TestClient) -> Server:
    """The low-level aiohttp server, which knows every open connection."""
    server = client.server.runner.server  # type: ignore[attr-defined]
    assert isinstance(server, Server)
    return server


async def status_of(client: TestClient, address: str) -> str:
    """`GET //status` as a proxy on loopback forwards it for `address`; the envelope's status code."""
    response = await client.session.get(url(client, "//status"), headers={"X-Real-IP": address})
    assert response.status == 200
    return (await response.json())["status"]



async def test_ten_thousand_spoofed_addresses_keep_the_http_limiter_table_at_its_cap_and_others_are_served(
        make_client: MakeClient) -> None:
    client = await make_client()  # default limits: 5 requests/s per client IP
    table = client.server.app[pipeline_key].limiter("http")
    assert table.max_entries == LIMITER_CAP
    rss_before = resident_bytes()
    started = time.monotonic()
    codes: list[str] = []
    for first in range(0, SPOOFED, 500):
        codes += await asyncio.gather(*(status_of(client, spoofed(n)) for n in range(first, first + 500)))
        assert len(table) <= LIMITER_CAP
    elapsed = time.monotonic() - started
    assert codes == ["000000"] * SPOOFED  # one request each: nobody was over the rate
    assert len(table) == LIMITER_CAP
    # The least recently seen addresses were forgotten first; the newest are all remembered.
    assert spoofed(0) not in table and spoofed(SPOOFED - 1) in table
    # A legitimate client is served, and the limiter still limits a client that floods on its own.
    assert await status_of(client, "192.0.2.1") == "000000"
    burst = [await status_of(client, "192.0.2.2") for _ in range(6)]
    assert burst[:5] == ["000000"] * 5 and burst[5] == "700001"
    assert len(table) == LIMITER_CAP
    assert resident_bytes() - rss_before < 100 * 1024 * 1024
    assert elapsed < 25, f"{SPOOFED} requests took {elapsed:.1f} s"


@contextmanager
def open_files_limit(wanted: int) -> Iterator[int]:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (up to the hard limit) for the test; yield it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield max(soft, target)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def read_envelope(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 response on a keep-alive connection: its status and JSON body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(status_line.split()[1]), json.loads(await reader.readexactly(length))


async def test_five_thousand_open_connections_leave_a_websocket_client_served_with_bounded_memory(
        make_client: MakeClient) -> None:
    # Each connection costs two descriptors here (client and server side live in this process).
    with open_files_limit(2 * CONNECTIONS + 1000) as limit:
        count = min(CONNECTIONS, (limit - 1000) // 2)
        assert count == CONNECTIONS, f"RLIMIT_NOFILE hard limit {limit} fits only {count} connections"
        client = await make_client()
        server = server_of(client)
        baseline = len(server.connections)
        rss_before = resident_bytes()
        started = time.monotonic()
        streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(0, count, 100):  # batches stay under the listen backlog
                streams += await asyncio.gather(*(asyncio.open_connection(client.host, client.port)
                                                  for _ in range(100)))
            # Half of them make one keep-alive request each, all from the same loopback address.
            talkers = streams[::2]
            for writer in (w for _, w in talkers):
                writer.write(KEEPALIVE_REQUEST)
            answers = await asyncio.wait_for(asyncio.gather(*(read_envelope(r) for r, _ in talkers)), 20)
            await wait_until(lambda: len(server.connections) >= baseline + count, 10)
            window = time.monotonic() - started

            async with ws_connect(client) as ws:  # a legitimate client, while all of them are open
                frames = await asyncio.wait_for(receive_answer_of(ws), 10)
            assert frames[-1]["content"] == "DONE" and frames[-2]["content"] == "Hello, **world**!"
            growth = resident_bytes() - rss_before
        finally:
            for _, writer in streams:
                writer.close()
            for _, writer in streams:
                with suppress(ConnectionError):
                    await writer.wait_closed()
        await wait_until(lambda: len(server.connections) <= baseline + 1, 10)
    assert len(streams) == count
    assert {status for status, _ in answers} == {200}
    codes = [body["status"] for _, body in answers]
    assert set(codes) <= {"000000", "700001"}
    # 5/s per client IP, a leaky bucket: 5 at once, then one per 0.2 s of the window.
    assert 1 <= codes.count("000000") <= 5 + int(window * 5) + 1
    assert all(body["msg"] == texts.HTTP_TOO_FAST for _, body in answers if body["status"] == "700001")
    assert growth < 300 * 1024 * 1024, f"resident memory grew {growth / 1e6:.0f} MB"
    assert time.monotonic() - started < 30


async def receive_answer_of(ws: ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Ask one question and return its frames up to the end frame."""
    await ws.send_json(question())
    return await receive_answer(ws)
