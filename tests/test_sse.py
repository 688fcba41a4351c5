"""The one upstream stream reader (aiohttp-sse-client, wrapped): one POST and never a reconnect, a
refused request readable before the library sees it, `[DONE]` ends the stream and frees the
connection, every wait for an event under a deadline that comments do not restart."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatgpt.domain.errors import UpstreamBroken, UpstreamError, UpstreamTimeout, UpstreamUnreachable
from chatgpt.upstream.events import event_payloads
from chatgpt.upstream.session import make_session

Script = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


class Upstream:
    """A tiny SSE server: each POST is answered by the next script; it records every POST's client port."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.posts: list[int] = []
        self.app = web.Application()
        self.app.router.add_post("/sse", self.sse)
        self.url = ""

    async def sse(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.posts.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        script = self.scripts.pop(0) if self.scripts else None
        if script is None:
            return web.json_response({"error": {"message": "no more answers"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await script(request, response)
        await response.write_eof()
        return response


def writes(*chunks: bytes, delay: float = 0.0) -> Script:
    async def script(request: web.Request, response: web.StreamResponse) -> None:
        for chunk in chunks:
            if delay:
                await asyncio.sleep(delay)
            await response.write(chunk)
    return script


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Upstream:
    fake = Upstream()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/sse"))
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with make_session(connect_timeout=2) as client:
        yield client


async def read(session: aiohttp.ClientSession, url: str, read_timeout: float = 5.0,
               answer_timeout: float = 30.0, pause: float = 0.0) -> list[str]:
    payloads = []
    async for batch in event_payloads(session, url, b"{}", {"Content-Type": "application/json"}, host="fake",
                                      read_timeout=read_timeout, answer_timeout=answer_timeout, parse=str):
        assert batch  # a batch holds at least one event
        payloads += batch
        if pause:
            await asyncio.sleep(pause)
    return payloads


async def test_payloads_come_untouched_until_done_and_the_connection_is_used_again(
        upstream: Upstream, session: aiohttp.ClientSession) -> None:
    stream = (b': OPENROUTER PROCESSING\n\ndata: {"a": 1}\n\nevent: x\nid: 7\nretry: 10\ndata: {"b":\ndata: 2}\n\n'
              b"data:no-space\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n")
    upstream.scripts += [writes(stream), writes(b"data: again\n\ndata: [DONE]\n\n")]
    assert await read(session, upstream.url) == ['{"a": 1}', '{"b":\n2}', "no-space"]
    assert await read(session, upstream.url) == ["again"]
    assert len(upstream.posts) == 2 and upstream.posts[0] == upstream.posts[1]  # one kept-alive connection


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_events_split_anywhere_across_network_reads_come_whole(upstream: Upstream, session: aiohttp.ClientSession,
                                                                    size: int) -> None:
    stream = ('data: {"t": "好的"}\r\n\r\n: ping\n\nevent: x\ndata: a\ndata: b\n\ndata:c\n\ndata: [DONE]\n\n').encode()
    upstream.scripts.append(writes(*[stream[i:i + size] for i in range(0, len(stream), size)], delay=0.001))
    assert await read(session, upstream.url) == ['{"t": "好的"}', "a\nb", "c"]


@pytest.mark.parametrize("ending", ["eof", "events after the end"])
async def test_a_stream_that_ends_without_done_is_broken_and_never_posted_again(
        upstream: Upstream, session: aiohttp.ClientSession, ending: str) -> None:
    upstream.scripts.append(writes(b"data: one\n\n", b"data: two\n\n", delay=0.01))
    upstream.scripts.append(writes(b"data: a second answer\n\ndata: [DONE]\n\n"))  # what a re-POST would get
    got: list[str] = []
    with pytest.raises(UpstreamBroken, match="ended before \\[DONE\\]"):
        async for batch in event_payloads(session, upstream.url, b"{}", {}, host="fake", read_timeout=5,
                                          answer_timeout=30, parse=str):
            got += batch
    await asyncio.sleep(0.2)  # the library would have re-POSTed at once (reconnection_time is 0)
    assert got == ["one", "two"]
    assert len(upstream.posts) == 1


async def test_a_connection_dropped_mid_stream_is_broken_and_never_posted_again(
        upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async def drop(request: web.Request, response: web.StreamResponse) -> None:
        await response.write(b"data: one\n\n")
        await asyncio.sleep(0.02)
        assert request.transport is not None
        request.transport.close()  # mid-body: no chunked-encoding terminator
        await asyncio.sleep(0.1)
    upstream.scripts.append(drop)
    with pytest.raises(UpstreamBroken, match="closed mid-answer"):
        await read(session, upstream.url)
    await asyncio.sleep(0.2)
    assert len(upstream.posts) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_a_refusal_is_our_upstream_error_with_its_json_and_the_connection_freed(
        aiohttp_server: Callable[..., Awaitable[TestServer]], status: int) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"refused {status}", "code": "nope"}}, status=status,
                                 headers={"Retry-After": "3"})
    app = web.Application()
    app.router.add_post("/sse", refuse)
    server = await aiohttp_server(app)
    # One connection at most: a response left unreleased would make the second call wait forever.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(2):
            with pytest.raises(UpstreamError) as caught:
                await asyncio.wait_for(read(session, str(server.make_url("/sse"))), 3)
            error = caught.value
            assert (error.status, error.message, error.code, error.headers) == (
                status, f"refused {status}", "nope", {"retry-after": "3"})


async def test_a_2xx_that_is_not_an_event_stream_is_refused(aiohttp_server: Callable[..., Awaitable[TestServer]],
                                                            session: aiohttp.ClientSession) -> None:
    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "choices": []})
    app = web.Application()
    app.router.add_post("/sse", whole)
    server = await aiohttp_server(app)
    with pytest.raises(UpstreamError, match="application/json instead of an event stream"):
        await read(session, str(server.make_url("/sse")))


@pytest.mark.parametrize("chunk, cause", [
    (b"data: " + b"x" * (2 * 1024 * 1024) + b"\n\n", "a line over the length limit"),
    (b"data: " + b"x" * (2 * 1024 * 1024), "a line over the length limit"),  # no newline at all
    (b'data: {"text": "\xff\xfe"}\n\n', "not UTF-8"),
])
async def test_unreadable_data_is_a_broken_upstream(upstream: Upstream, session: aiohttp.ClientSession,
                                                    chunk: bytes, cause: str) -> None:
    upstream.scripts.append(writes(b"data: fine\n\n", chunk))
    with pytest.raises(UpstreamBroken, match=cause):
        await read(session, upstream.url)


async def test_comments_are_not_progress(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    upstream.scripts.append(writes(b"data: one\n\n", *[b": keep-alive\n\n"] * 200, delay=0.05))
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout, match="sent no answer event for 0.3 s"):
        await read(session, upstream.url, read_timeout=0.3)
    assert 0.3 <= asyncio.get_running_loop().time() - started < 1.5


async def test_an_upstream_silent_before_its_headers_times_out(
        aiohttp_server: Callable[..., Awaitable[TestServer]], session: aiohttp.ClientSession) -> None:
    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response()
    app = web.Application()
    app.router.add_post("/sse", silent)
    server = await aiohttp_server(app)
    with pytest.raises(UpstreamTimeout, match="0.3 s"):
        await read(session, str(server.make_url("/sse")), read_timeout=0.3)


async def test_the_answer_timeout_caps_a_stream_that_keeps_sending(upstream: Upstream,
                                                                   session: aiohttp.ClientSession) -> None:
    upstream.scripts.append(writes(*[b"data: more\n\n"] * 200, delay=0.05))
    with pytest.raises(UpstreamTimeout, match="took longer than 0.4 s for one answer"):
        await read(session, upstream.url, read_timeout=5, answer_timeout=0.4)


async def test_time_our_side_spends_between_events_does_not_count(upstream: Upstream,
                                                                  session: aiohttp.ClientSession) -> None:
    # The whole answer is already there; the reader is slow (a client that reads slowly).
    upstream.scripts.append(writes(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n"))
    assert await read(session, upstream.url, read_timeout=0.2, pause=0.3) == ["1", "2", "3"]


async def test_an_unreachable_upstream_is_told_as_such(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnreachable, match="Could not reach the upstream fake"):
        await read(session, "http://127.0.0.1:9/sse")


async def test_payload_of_the_reader_reaches_a_caller_that_stops_early_without_leaking(
        upstream: Upstream, session: aiohttp.ClientSession) -> None:
    upstream.scripts.append(writes(b"data: 1\n\n", *[b": keep-alive\n\n"] * 100, delay=0.02))
    reader = event_payloads(session, upstream.url, b"{}", {}, host="fake", read_timeout=5, answer_timeout=30,
                            parse=str)
    assert await anext(reader) == ["1"]
    await reader.aclose()  # a client that left: the connection is closed, nothing re-POSTed
    await asyncio.sleep(0.1)
    assert len(upstream.posts) == 1



async def test_the_events_of_one_read_come_as_one_batch(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    upstream.scripts.append(writes(b"data: 1\n\ndata: 2\n\n", b"data: 3\n\ndata: [DONE]\n\n", delay=0.05))
    batches = [batch async for batch in event_payloads(session, upstream.url, b"{}", {}, host="fake", read_timeout=5,
                                                       answer_timeout=30, parse=str)]
    assert batches == [["1", "2"], ["3"]]


async def test_an_event_refused_by_the_parser_ends_the_stream_after_the_good_ones_before_it(
        upstream: Upstream, session: aiohttp.ClientSession) -> None:
    def parse(data: str) -> int:
        return int(data)  # "x" is refused, as delta_of refuses an event that is not JSON
    upstream.scripts.append(writes(b"data: 1\n\ndata: 2\n\ndata: x\n\ndata: 4\n\ndata: [DONE]\n\n"))
    got: list[int] = []
    with pytest.raises(UpstreamBroken, match="cannot be read"):
        async for batch in event_payloads(session, upstream.url, b"{}", {}, host="fake", read_timeout=5,
                                          answer_timeout=30, parse=parse):
            got += batch
    assert got == [1, 2]
