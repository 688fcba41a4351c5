"""Upstream faults (issue 7): each way the upstream can fail ends the question with one clear error,
through the websocket and `/v1` alike, within the configured timeouts; the anonymous quota is charged
only when text was produced; key health follows the failure; no task, connection or file is left."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatgpt.domain import texts
from chatgpt.faces.markdown import to_html
from chatgpt.keys import pipeline_key, routes_key, session_key
from tests.conftest import CLIENT_TOKEN, MakeClient, ws_connect
from tests.fakes.openai import SSE_DONE, Fail, FakeOpenAI, FaultyOpenAI, RawStream, Stream, sse_chunk
from tests.helpers.frames import receive_answer
from tests.helpers.servers import refusing_port

ADMIN_TOKEN = "adm-upstream-faults-5150"
IDENTITY = "127.0.0.1"  # the anonymous user's identity: the loopback peer, no proxy headers
DAILY = 5
QUICK = 2.0  # seconds: every fault but a hang ends well inside connect_timeout (2 s) and read_timeout (5 s)
HANG_READ_TIMEOUT = 0.5
ERROR_KEYS = {"message", "type", "param", "code"}
Behaviour = Stream | Fail | RawStream


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Any]) -> FakeOpenAI:
    """The fake upstream with the raw-bytes behaviours too (replaces conftest's `fake` in this file)."""
    upstream = FaultyOpenAI()
    server: TestServer = await aiohttp_server(upstream.app)
    upstream.base_url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return upstream


@dataclass(frozen=True)
class Fault:
    """One upstream failure and what the client, the quota and the key pool must make of it."""

    behaviour: Callable[[], Behaviour] | None  # None: the upstream address itself fails (see `upstream`)
    message: str  # the error text the mini-program shows
    v1_status: int  # HTTP status of a /v1 error answered before any of the answer was sent
    v1_message: str  # the English text an SDK user gets (PROTOCOL.md E.2)
    key_state: str = "healthy"  # the server key's health afterwards: healthy | cooling | disabled
    text: str = ""  # answer text relayed before the fault; "" means the quota is given back
    # The upstream sent something of an answer before failing, so a /v1 stream has begun (HTTP 200). Events
    # with nothing in them (the opening role chunk) are held back: a failure after them still has its status.
    opened: bool = False
    upstream: dict[str, Any] = field(default_factory=dict)  # settings overrides
    retry_after: str | None = None  # Retry-After the /v1 error must carry
    cooling: float | None = None  # seconds the key cools for (429)
    seconds: float = QUICK  # the question must have ended within this


def completion_json() -> bytes:
    """A whole non-streamed chat completion: valid JSON, but not the SSE that was asked for."""
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-3.5-turbo",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                    "finish_reason": "stop"}]}).encode()


NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
             b"</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
IN_STREAM_ERROR = b'data: {"error": {"message": "The server had an error while processing your request.", ' \
                  b'"type": "server_error", "param": null, "code": null}}\n\n'
TWO_MB_LINE = b"data: " + b"x" * (2 * 1024 * 1024) + b"\n\n"
FAILED, UNREACHABLE, BUSY = texts.UPSTREAM_FAILED, texts.UPSTREAM_UNREACHABLE, texts.SERVER_BUSY
KEY_REFUSED = "The upstream refused this server's key; try again later."
KEYS_BUSY = "Every upstream key of this server is busy; try again later."
BROKE = "The upstream at 127.0.0.1 broke off its answer or sent something unreadable."
SILENT = "The upstream {host} sent no answer event for 0.5 s (upstream.read_timeout)."  # which limit ran out
TIMEOUT = texts.UPSTREAM_TIMEOUT

FAULTS: dict[str, Fault] = {
    # A refusal of the server's own key is the operator's business: the client gets the generic text.
    "401 invalid key": Fault(lambda: Fail(401, "Incorrect API key provided: sk-ser***0001.", "invalid_api_key"),
                             FAILED, 503, KEY_REFUSED, key_state="disabled"),
    "403 forbidden": Fault(lambda: Fail(403, "Country, region, or territory not supported.",
                                        "unsupported_country_region_territory"), FAILED, 503, KEY_REFUSED),
    "404 no such model": Fault(lambda: Fail(404, "The model `gpt-9` does not exist.", "model_not_found"),
                               "The model `gpt-9` does not exist.", 404, "The model `gpt-9` does not exist."),
    # The only key is cooling: busy, with the wait until it is usable (PROTOCOL.md E.1).
    "429 with Retry-After": Fault(lambda: Fail(429, "Rate limit reached for requests.", "rate_limit_exceeded",
                                               headers={"Retry-After": "7"}),
                                  BUSY, 503, KEYS_BUSY, key_state="cooling", retry_after="7", cooling=7.0),
    "429 without Retry-After": Fault(lambda: Fail(429, "Rate limit reached for requests.", "rate_limit_exceeded"),
                                     BUSY, 503, KEYS_BUSY, key_state="cooling", retry_after="20", cooling=20.0),
    "429 insufficient quota": Fault(lambda: Fail(429, "You exceeded your current quota.", "insufficient_quota"),
                                    FAILED, 503, KEY_REFUSED, key_state="disabled"),
    "500 json": Fault(lambda: Fail(500, "upstream says 500"), "upstream says 500", 502, "upstream says 500"),
    "502 json": Fault(lambda: Fail(502, "upstream says 502"), "upstream says 502", 502, "upstream says 502"),
    "503 json": Fault(lambda: Fail(503, "upstream says 503"), "upstream says 503", 502, "upstream says 503"),
    "500 plain text body": Fault(lambda: Fail(500, raw=b"Internal Server Error",
                                              headers={"Content-Type": "text/plain"}),
                                 FAILED, 502, "The upstream at 127.0.0.1 failed (HTTP 500)."),
    "503 json without an error object": Fault(lambda: Fail(503, raw=b'{"detail": "overloaded"}',
                                                           headers={"Content-Type": "application/json"}),
                                              FAILED, 502, "The upstream at 127.0.0.1 failed (HTTP 503)."),
    "502 html page": Fault(lambda: Fail(502, raw=NGINX_502, headers={"Content-Type": "text/html"}),
                           FAILED, 502, "The upstream at 127.0.0.1 failed (HTTP 502)."),
    "200 json instead of sse": Fault(lambda: RawStream([completion_json()], content_type="application/json"),
                                     FAILED, 502, BROKE),
    "garbage sse line first": Fault(lambda: RawStream([b"data: {not json\n\n"]), FAILED, 502, BROKE),
    "sse line that is not utf-8": Fault(
        lambda: RawStream([sse_chunk(None), sse_chunk("Hel"), b'data: {"choices": "\xff\xfe"}\n\n'], delay=0.02),
        FAILED, 502, BROKE, text="Hel", opened=True),
    "garbage sse line after text": Fault(
        lambda: RawStream([sse_chunk(None), sse_chunk("Hel"), b"data: {not json\n\n"], delay=0.02),
        FAILED, 502, BROKE, text="Hel", opened=True),
    "error event inside the stream": Fault(
        lambda: RawStream([sse_chunk(None), IN_STREAM_ERROR], delay=0.02),
        "The server had an error while processing your request.", 502,
        "The server had an error while processing your request."),
    "2 MB sse line": Fault(lambda: RawStream([sse_chunk(None), TWO_MB_LINE], delay=0.02), FAILED, 502, BROKE),
    "stream ends without done": Fault(lambda: Stream(pieces=["partial ", "answer"], delay=0.02, done=False),
                                      FAILED, 502, BROKE, text="partial answer", opened=True),
    "connection reset mid-answer": Fault(
        lambda: RawStream([sse_chunk(None), sse_chunk("partial")], delay=0.02, end="reset"),
        FAILED, 502, BROKE, text="partial", opened=True),
    "connection reset before any event": Fault(lambda: RawStream([], end="reset"), FAILED, 502, BROKE),
    "stream hangs before any text": Fault(
        lambda: Stream(pieces=[], hang=True), TIMEOUT, 504, SILENT,  # a read timeout is a gateway timeout
        upstream={"read_timeout": HANG_READ_TIMEOUT}, seconds=HANG_READ_TIMEOUT + 1.0),
    "stream hangs after some text": Fault(
        lambda: Stream(pieces=["partial"], hang=True), TIMEOUT, 504, SILENT, text="partial", opened=True,
        upstream={"read_timeout": HANG_READ_TIMEOUT}, seconds=HANG_READ_TIMEOUT + 1.0),
    # DeepSeek while a request waits in its queue: comments, never an event. Comments are not progress.
    "only keep-alive comments, forever": Fault(
        lambda: RawStream([b": keep-alive\n\n"] * 1000, delay=0.05), TIMEOUT, 504, SILENT,
        upstream={"read_timeout": HANG_READ_TIMEOUT}, seconds=HANG_READ_TIMEOUT + 1.0),
    "keep-alive comments after some text": Fault(
        lambda: Stream(pieces=["partial"], hang=True, keep_alive=0.05), TIMEOUT, 504, SILENT, text="partial",
        opened=True, upstream={"read_timeout": HANG_READ_TIMEOUT}, seconds=HANG_READ_TIMEOUT + 1.0),
    "connection refused": Fault(None, UNREACHABLE, 502, "Could not reach the upstream at 127.0.0.1.",
                                upstream={"base_url": f"http://127.0.0.1:{refusing_port()}/v1"}),
    # .invalid never resolves (RFC 6761): the resolver fails, so no connection to anywhere is attempted.
    "dns failure": Fault(None, UNREACHABLE, 502, "Could not reach the upstream at no-such-host.invalid.",
                         upstream={"base_url": "http://no-such-host.invalid/v1"}),
}


def ws_question() -> dict[str, Any]:
    """An anonymous (isDemo) chat question as the mini-program sends it."""
    return {"conversationId": "c-fault", "id": "u-1", "parentId": 1, "authType": "api", "authValue": "Bearer ",
            "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
            "messages": [{"role": "user", "content": "你好", "isSend": True, "id": "u-1"}]}


def v1_body(stream: bool) -> dict[str, Any]:
    """An anonymous `/v1` chat completion request."""
    return {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}


async def ask_on_the_websocket(client: TestClient, fault: Fault) -> float:
    """Ask once on a fresh socket; check the frames; return how long the question took."""
    async with ws_connect(client) as ws:
        started = time.monotonic()
        await ws.send_json(ws_question())
        frames = await receive_answer(ws, fault.seconds + 3)
        elapsed = time.monotonic() - started
        # Nothing may follow the end frame: the next frame is the answer to a heartbeat.
        await ws.send_json({"heart": "ping"})
        assert (await asyncio.wait_for(ws.receive_json(), 3))["heart"] == "pong"
        assert not ws.closed  # the socket outlives a failed answer
    *pieces, end = frames
    assert end == {"conversationId": "c-fault", "role": "assistant", "content": fault.message,
                   "html": to_html(fault.message), "createTime": end["createTime"], "isDone": True,
                   "isSuccess": False}
    assert all(f["isDone"] is False and f["isSuccess"] is True for f in pieces)
    assert (pieces[-1]["content"] if pieces else "") == fault.text
    return elapsed


def sse_payloads(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string)."""
    payloads = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event.removeprefix(b"data: ").decode()
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def ask_on_v1(client: TestClient, fault: Fault, stream: bool, host: str) -> float:
    """Ask once on `/v1`; check the error (JSON, or inside a begun stream); return how long it took."""
    started = time.monotonic()
    response = await asyncio.wait_for(client.post(
        "/v1/chat/completions", json=v1_body(stream), headers={"Connection": "close"}), fault.seconds + 3)
    async with response:
        raw = await asyncio.wait_for(response.read(), fault.seconds + 3)
    elapsed = time.monotonic() - started
    if stream and fault.opened:
        # The headers had gone out: OpenAI reports a failure as a last `error` event, without [DONE].
        assert response.status == 200 and response.content_type == "text/event-stream"
        *chunks, last = sse_payloads(raw)
        assert set(last) == {"error"} and set(last["error"]) == ERROR_KEYS, raw[-300:]
        assert last["error"]["message"] == fault.v1_message.format(host=host)
        assert all(isinstance(c, dict) and "error" not in c for c in chunks), "one error event, and only at the end"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == fault.text
        assert not raw.endswith(SSE_DONE)
        return elapsed
    assert response.status == fault.v1_status, raw[:300]
    assert response.content_type == "application/json"
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["message"] == fault.v1_message.format(host=host)
    if fault.retry_after is not None:
        assert response.headers.get("Retry-After") == fault.retry_after
    return elapsed


def is_kept_alive_at(task: asyncio.Task[Any], port: int) -> bool:
    """A server's connection task on `port` (the fake upstream's) waiting for the connection's next request."""
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    handler = frame.f_locals.get("self") if frame is not None else None
    transport = getattr(handler, "transport", None)
    return (getattr(coro, "__qualname__", "") == "RequestHandler.start" and transport is not None
            and transport.get_extra_info("sockname")[1] == port)


async def tasks_left_over(before: set[asyncio.Task[Any]], client: TestClient, fake: FakeOpenAI,
                          settle: float = 2.0) -> list[str]:
    """Tasks started since `before` still running after up to `settle` seconds. A connection the app's
    upstream pool keeps alive (idle, released) has its server-side task at the fake: those are allowed,
    as many as the pool holds idle connections."""
    connector = client.app[session_key].connector
    fake_port = int(fake.base_url.split(":")[2].split("/")[0])  # type: ignore[attr-defined]
    deadline = time.monotonic() + settle
    while True:
        extra = [t for t in asyncio.all_tasks() if t not in before and not t.done()]
        # `_conns` is aiohttp's private pool of idle kept-alive connections (no public count exists).
        idle = sum(len(c) for c in connector._conns.values())  # type: ignore[union-attr]
        kept = [t for t in extra if is_kept_alive_at(t, fake_port)]
        if len(kept) <= idle:
            extra = [t for t in extra if t not in kept]
        if not extra or time.monotonic() > deadline:
            return [repr(t.get_coro()) for t in extra]
        await asyncio.sleep(0.02)


def files_left(tmp_path: Path) -> list[str]:
    """Every file under the test's folder (images, state, temp files) but the settings it was started with
    and the state file's lock, held while the app runs."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and p.name not in ("settings.yaml", "state.json.lock"))


async def server_key_health(client: TestClient) -> dict[str, Any]:
    """The one server key's row of `GET /admin/keys`."""
    response = await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                         "Connection": "close"})
    assert response.status == 200
    body = await response.json()
    [row] = body["keys"]
    return dict(row)


@pytest.mark.parametrize("entry", ["websocket", "v1", "v1 stream"])
@pytest.mark.parametrize("name", list(FAULTS))
async def test_an_upstream_fault_ends_the_question_with_one_clear_error_and_leaves_nothing_behind(
        make_client: MakeClient, fake: FakeOpenAI, tmp_path: Path, name: str, entry: str) -> None:
    fault = FAULTS[name]
    client = await make_client(upstream=fault.upstream, quota={"daily_questions": DAILY}, admin={"token": ADMIN_TOKEN},
                               limits={"http_per_second": 100})
    if fault.behaviour is not None:
        fake.script.append(fault.behaviour())
    pipeline = client.app[pipeline_key]
    before = set(asyncio.all_tasks())

    if entry == "websocket":
        elapsed = await ask_on_the_websocket(client, fault)
    else:
        host = fake.base_url.split("/")[2]  # type: ignore[attr-defined]
        elapsed = await ask_on_v1(client, fault, entry == "v1 stream", host)

    assert elapsed < fault.seconds, f"the question took {elapsed:.2f} s"
    if fault.upstream.get("read_timeout"):
        assert elapsed >= HANG_READ_TIMEOUT * 0.9, "it ended before the upstream was silent for read_timeout"
    # Charged only when the user got text (PROTOCOL.md A.5, C.2).
    assert await pipeline.remaining(IDENTITY) == DAILY - (1 if fault.text else 0)
    # Exactly one POST: a failed question is never re-sent (it may already be billed).
    assert len(fake.chat_requests()) == (0 if fault.behaviour is None else 1)
    # Nothing left behind: tasks (ours and the fake's), upstream connections, files.
    assert await tasks_left_over(before, client, fake) == []
    assert isinstance(fake, FaultyOpenAI) and fake.handlers_running == 0
    # `_acquired` is aiohttp's private set of connections handed out and not yet released: the public
    # API has no count of busy connections.
    assert len(client.app[session_key].connector._acquired) == 0  # type: ignore[union-attr]
    assert files_left(tmp_path) == []
    health = await server_key_health(client)
    assert health["state"] == fault.key_state, health
    assert health["requests"] == 1 and health["failures"] == 1, health
    if fault.cooling is not None:
        assert fault.cooling - 1 < health["until"] <= fault.cooling, health
    if fault.key_state == "disabled":
        assert client.app[routes_key].upstreams[0].keys.usable() == 0


@pytest.mark.parametrize("split", [False, True], ids=["one read", "a read per event"])
async def test_comments_and_multi_line_events_from_the_upstream_reach_an_sdk_as_the_same_chunks(
        make_client: MakeClient, fake: FaultyOpenAI, split: bool) -> None:
    # Not OpenAI's own spelling, but valid SSE that compatible servers send: the relay must not
    # pass a multi-line event on as one line (the SDK would read half a JSON object).
    events = [sse_chunk(None), b": keep-alive\n\n",
              b'data: {"id": "chatcmpl-fake-1", "object": "chat.completion.chunk", "created": 1,\n'
              b'data:  "model": "gpt-3.5-turbo",\n'
              b'data:  "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n',
              sse_chunk("lo"), sse_chunk(None, finish="stop"), SSE_DONE]
    fake.script.append(RawStream(events if split else [b"".join(events)], delay=0.01 if split else 0.0))
    client = await make_client()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=CLIENT_TOKEN, max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}], stream=True)
        chunks = [chunk async for chunk in stream]
    finally:
        await sdk.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert {c.id for c in chunks} == {"chatcmpl-fake-1"}


@pytest.mark.parametrize("accept", ["text/plain", "text/event-stream"])
async def test_chat_is_504_before_any_byte_when_the_upstream_sends_only_keep_alive_comments(
        make_client: MakeClient, fake: FaultyOpenAI, accept: str) -> None:
    client = await make_client(upstream={"read_timeout": 0.3})
    fake.script.append(RawStream([b": keep-alive\n\n"] * 1000, delay=0.05))
    response = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": accept})
    assert response.status == 504
    host = fake.base_url.split("/")[2]  # type: ignore[attr-defined]
    assert (await response.json())["error"]["message"] == (
        f"The upstream {host} sent no answer event for 0.3 s (upstream.read_timeout).")


async def test_chat_ends_with_an_error_event_when_the_upstream_falls_silent_after_some_text(
        make_client: MakeClient, fake: FaultyOpenAI) -> None:
    client = await make_client(upstream={"read_timeout": 0.3})
    fake.script.append(Stream(pieces=["partial"], hang=True, keep_alive=0.05))
    response = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": "text/event-stream"})
    assert response.status == 200
    text = await response.text()
    host = fake.base_url.split("/")[2]  # type: ignore[attr-defined]
    assert text.endswith('event: error\ndata: {"message":"The upstream %s sent no answer event for 0.3 s '
                         '(upstream.read_timeout)."}\n\n' % host)
    assert 'data: {"content":"partial"}' in text


async def test_the_answer_timeout_ends_a_websocket_answer_that_keeps_coming(
        make_client: MakeClient, fake: FaultyOpenAI) -> None:
    client = await make_client(upstream={"answer_timeout": 0.5}, quota={"daily_questions": DAILY})
    fake.script.append(Stream(pieces=["word "] * 100, delay=0.05))
    async with ws_connect(client) as ws:
        await ws.send_json(ws_question())
        frames = await receive_answer(ws, 5)
    *pieces, end = frames
    assert (end["content"], end["isDone"], end["isSuccess"]) == (TIMEOUT, True, False)
    assert pieces and pieces[-1]["content"].startswith("word word")
    # Text was produced: the question is charged.
    assert await client.app[pipeline_key].remaining(IDENTITY) == DAILY - 1
