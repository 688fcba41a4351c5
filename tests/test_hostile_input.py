"""Fault suite, hostile input: generated and hand-picked websocket frames and HTTP requests.

Every frame gets the contract's answer (one error frame, or a complete answer) or a documented close
code, the socket stays usable, memory returns to baseline, and no client input makes the process log
a traceback.
"""
from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import math
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.client import ClientWebSocketResponse
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatgpt.domain import texts
from chatgpt.keys import sockets_key, state_key
from tests.conftest import SERVER_KEY, MakeClient, url, ws_connect
from tests.fakes.openai import FakeOpenAI
from tests.helpers.frames import question, wait_until

MAX_BYTES = 1048576  # ws.max_message_bytes, also the app's client_max_size (test settings keep the default)
FAKE_TEXT = "Hello, **world**!"  # what the fake upstream answers by default
MISSING = object()  # "no conversationId in the frame"
SERVE_FREELY = {"limits": {"ws_per_minute": 1_000_000, "http_per_second": 1_000_000},
                "quota": {"daily_questions": 1_000_000}}

# --- helpers ---------------------------------------------------------------------------------------


def strict_json(text: str) -> Any:
    """Parse as a browser's JSON.parse would: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records at ERROR or carrying a traceback (after collecting, so lost task errors show)."""
    gc.collect()
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


async def next_frame(ws: ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next server frame: a text frame holding strict JSON (the mini-program uses JSON.parse)."""
    message = await asyncio.wait_for(ws.receive(), timeout)
    assert message.type == WSMsgType.TEXT, message
    frame = strict_json(message.data)
    assert isinstance(frame, dict)
    return frame


async def frames_until_done(ws: ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Frames up to and including the one with isDone true."""
    frames = [await next_frame(ws)]
    while not frames[-1].get("isDone"):
        frames.append(await next_frame(ws))
    return frames


async def assert_heartbeat(ws: ClientWebSocketResponse) -> None:
    """The socket is still open and answers a heartbeat at once."""
    await ws.send_str('{"heart": "ping"}')
    pong = await next_frame(ws)
    assert set(pong) == {"heart", "time"} and pong["heart"] == "pong" and isinstance(pong["time"], int)


def echoed(frame: dict[str, Any]) -> Any:
    """The conversationId the contract echoes: a JSON scalar exactly as sent, else nothing."""
    cid = frame.get("conversationId")
    return cid if isinstance(cid, (str, int, float, bool)) else MISSING


def assert_cid(reply: dict[str, Any], expected: Any) -> None:
    """Same value and same JSON type, or absent."""
    got = reply.get("conversationId", MISSING)
    if expected is MISSING:
        assert got is MISSING, reply
    else:
        assert type(got) is type(expected) and got == expected, (reply, expected)


def assert_error_frame(frames: list[dict[str, Any]], cid: Any) -> str:
    """Exactly one error/refusal frame ending the question; returns its text."""
    assert len(frames) == 1, frames
    frame = frames[0]
    assert frame["isDone"] is True and frame["isSuccess"] is False, frame
    assert isinstance(frame["content"], str) and frame["content"], frame
    assert isinstance(frame["html"], str) and isinstance(frame["createTime"], str), frame
    assert_cid(frame, cid)
    return frame["content"]


def assert_complete_answer(frames: list[dict[str, Any]], cid: Any) -> None:
    """Cumulative text frames of one answer id, then the one DONE frame."""
    *pieces, end = frames
    assert pieces, frames
    assert all(f["isDone"] is False and f["isSuccess"] is True and f["role"] == "assistant" for f in pieces)
    assert len({f["id"] for f in pieces}) == 1 and pieces[-1]["content"] == FAKE_TEXT
    assert (end["content"], end["html"], end["isDone"], end["isSuccess"]) == ("DONE", "DONE", True, True)
    assert "id" not in end
    for frame in frames:
        assert_cid(frame, cid)


async def assert_contract_reply(ws: ClientWebSocketResponse, raw: str) -> None:
    """Send one text frame and check the reply the contract gives that frame, then a heartbeat."""
    try:
        value = json.loads(raw)  # what the server sees (Python's json, as the server uses)
    except (ValueError, RecursionError):
        value = None
    await ws.send_str(raw)
    if isinstance(value, dict) and value.get("heart") == "ping":
        assert (await next_frame(ws))["heart"] == "pong"
    elif isinstance(value, dict):
        frames = await frames_until_done(ws)
        if frames[-1]["isSuccess"] is False:
            assert_error_frame(frames, echoed(value))
        else:
            assert_complete_answer(frames, echoed(value))
    else:
        assert assert_error_frame(await frames_until_done(ws), MISSING) == texts.FRAME_NOT_JSON
    await assert_heartbeat(ws)



def http_request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request exactly as written: no client normalises the path or checks headers."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def raw_http(client: TestClient, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; return status, headers and body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def envelope_of(body: bytes) -> dict[str, Any]:
    """An envelope's fields, with the timestamp checked and removed."""
    data = strict_json(body.decode())
    assert isinstance(data.pop("timestamp"), int)
    return data


def openai_error(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON for a request error."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


# --- generated websocket frames ----------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
# Contract types of the inbound fields (PROTOCOL.md A.3); conversationId may be any JSON scalar.
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "conversationId": (str, int, float, bool), "id": (str,), "parentId": (str, int, float),
    "authType": (str,), "authValue": (str,), "isDemo": (bool,), "content": (str,), "messages": (list,),
    "isGenImg": (bool,), "isSender": (bool,), "model": (str,),
}
KNOWN_KEYS = st.sampled_from([*FIELD_TYPES, "heart"])
# Objects that use the contract's keys with arbitrary values reach past "is it an object?".
CONTRACT_KEYED_OBJECTS = st.dictionaries(KNOWN_KEYS | st.text(max_size=10), JSON_VALUES, max_size=8)
JSONISH = st.text(alphabet='{}[]":,.-+eE0123456789truefalsnNIiy \\', max_size=60)
GENERATED = settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def wrongly_typed_questions(draw: st.DrawFn) -> tuple[dict[str, Any], set[str]]:
    """A question as the mini-program sends it with some fields replaced by values of a wrong type."""
    fields = draw(st.sets(st.sampled_from(sorted(FIELD_TYPES)), min_size=1, max_size=4))
    frame = question(conversationId="c-h")
    for name in sorted(fields):
        kinds = FIELD_TYPES[name]
        frame[name] = draw(JSON_VALUES.filter(lambda v, k=kinds: v is not None and not isinstance(v, k)))
    return frame, fields


@pytest.fixture
async def open_socket(make_client: MakeClient, caplog: pytest.LogCaptureFixture
                      ) -> AsyncIterator[ClientWebSocketResponse]:
    """One app and one socket shared by every generated example of a test (limits out of the way,
    so frames reach validation instead of the limiter); no traceback logged by the end."""
    client = await make_client(**SERVE_FREELY)
    async with ws_connect(client) as ws:
        yield ws
        assert not ws.closed
    assert tracebacks(caplog) == []


@GENERATED
@given(value=JSON_VALUES | CONTRACT_KEYED_OBJECTS)
async def test_any_json_value_gets_one_error_frame_or_a_complete_answer_and_the_socket_stays_open(
        open_socket: ClientWebSocketResponse, value: Any) -> None:
    await assert_contract_reply(open_socket, json.dumps(value))


@GENERATED
@given(case=wrongly_typed_questions())
async def test_a_question_with_wrongly_typed_fields_gets_one_error_frame_naming_a_wrong_field(
        open_socket: ClientWebSocketResponse, case: tuple[dict[str, Any], set[str]]) -> None:
    frame, wrong = case
    await open_socket.send_str(json.dumps(frame))
    text = assert_error_frame(await frames_until_done(open_socket), echoed(frame))
    assert text in {texts.FRAME_BAD_FIELD.format(field=name) for name in wrong}
    await assert_heartbeat(open_socket)


CONTEXT_ITEMS = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": JSON_SCALARS},
    optional={"html": JSON_VALUES, "isSend": JSON_VALUES, "id": JSON_VALUES})


@GENERATED
@given(context=st.lists(CONTEXT_ITEMS | JSON_VALUES, max_size=5))
async def test_arbitrary_context_items_get_one_error_frame_or_a_complete_answer(
        open_socket: ClientWebSocketResponse, context: list[Any]) -> None:
    await assert_contract_reply(open_socket, json.dumps(question(messages=context)))


@GENERATED
@given(text=st.text() | JSONISH)
async def test_any_text_frame_gets_the_contract_reply_and_the_socket_stays_open(
        open_socket: ClientWebSocketResponse, text: str) -> None:
    await assert_contract_reply(open_socket, text)


# --- hand-picked websocket frames -------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '"' + "x" * 900_000 + '"',
    "1" * 5_000,  # beyond Python's int-from-text digit limit
    json.dumps(["x" * 1000] * 800),
], ids=["deep-arrays", "deep-objects", "string-900KB", "5000-digit-number", "array-800KB"])
async def test_absurd_json_gets_the_not_json_error_frame_without_a_traceback(
        client: TestClient, caplog: pytest.LogCaptureFixture, raw: str) -> None:
    async with ws_connect(client) as ws:
        await ws.send_str(raw)
        assert assert_error_frame(await frames_until_done(ws), MISSING) == texts.FRAME_NOT_JSON
        await assert_heartbeat(ws)
    assert tracebacks(caplog) == []


async def test_a_900_kilobyte_prompt_is_refused_as_too_long_with_one_error_frame(client: TestClient,
                                                                                fake: FakeOpenAI) -> None:
    async with ws_connect(client) as ws:
        prompt = "问" * 300_000  # 900 KB of UTF-8
        await ws.send_str(json.dumps(question(messages=[{"role": "user", "content": prompt}]), ensure_ascii=False))
        assert assert_error_frame(await frames_until_done(ws), "c-1") == texts.PROMPT_TOO_LONG
        await assert_heartbeat(ws)
    assert fake.chat_requests() == []


@pytest.mark.parametrize("payload", [b"", b"\x00\x01", json.dumps(question()).encode(), b"\xff" * 100_000])
async def test_binary_frames_get_the_not_json_error_frame_and_the_socket_stays_open(
        client: TestClient, caplog: pytest.LogCaptureFixture, payload: bytes) -> None:
    async with ws_connect(client) as ws:
        await ws.send_bytes(payload)
        assert assert_error_frame(await frames_until_done(ws), MISSING) == texts.FRAME_NOT_JSON
        await assert_heartbeat(ws)
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("data", [b"\xff\xfe", b'{"heart": "ping", "x": "\xc3"}', b"\xed\xa0\x80"],
                         ids=["not-utf8", "truncated-sequence", "encoded-surrogate"])
async def test_invalid_utf8_in_a_text_frame_closes_the_socket_with_1007(
        client: TestClient, caplog: pytest.LogCaptureFixture, data: bytes) -> None:
    app = client.server.app
    async with ws_connect(client) as ws:
        # send_str cannot produce invalid UTF-8; send_frame sends these bytes as a TEXT frame as they are.
        await ws.send_frame(data, WSMsgType.TEXT)
        message = await asyncio.wait_for(ws.receive(), 5)
        assert (message.type, message.data, ws.close_code) == (WSMsgType.CLOSE, 1007, 1007)
    async with ws_connect(client) as ws:  # the server goes on serving
        await assert_heartbeat(ws)
    await wait_until(lambda: len(app[sockets_key]) == 0)
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_a_frame_over_the_size_limit_closes_with_1009_and_the_server_goes_on(
        client: TestClient, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    async with ws_connect(client) as ws:
        if kind == "text":
            await ws.send_str("x" * (MAX_BYTES + 1))
        else:
            await ws.send_bytes(b"x" * (MAX_BYTES + 1))
        message = await asyncio.wait_for(ws.receive(), 5)
        assert (message.type, ws.close_code) == (WSMsgType.CLOSE, 1009)
    async with ws_connect(client) as ws:
        await assert_heartbeat(ws)
    assert tracebacks(caplog) == []


async def test_a_frame_of_exactly_max_message_bytes_is_accepted(client: TestClient) -> None:
    # PROTOCOL.md A.3 / C.7: frames *up to* 1 MiB are accepted, so exactly 1 MiB is not "over".
    async with ws_connect(client) as ws:
        await ws.send_str("x" * MAX_BYTES)
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type == WSMsgType.TEXT, (message, ws.close_code)
        assert assert_error_frame([strict_json(message.data)], MISSING) == texts.FRAME_NOT_JSON


@pytest.mark.parametrize("raw", ['{"conversationId": NaN}', '{"conversationId": Infinity}',
                                 '{"conversationId": -Infinity}', '{"conversationId": 1e999}',
                                 json.dumps(question(conversationId=None)).replace("null", "NaN", 1)],
                         ids=["NaN", "Infinity", "-Infinity", "1e999", "question-with-NaN-id"])
async def test_non_finite_numbers_never_make_the_server_send_invalid_json(
        client: TestClient, raw: str) -> None:
    # Python's json accepts NaN/Infinity (and 1e999 overflows to inf); echoing them back as a
    # conversationId would send a frame the mini-program's JSON.parse cannot read.
    async with ws_connect(client) as ws:
        await ws.send_str(raw)
        frames = await frames_until_done(ws)  # next_frame parses strictly
        assert frames[-1]["isDone"] is True
        await assert_heartbeat(ws)


async def test_a_lone_surrogate_conversation_id_is_echoed_and_the_question_still_answered(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    # "\ud800" is a valid JSON escape; the frame echoing it cannot be UTF-8 encoded as is.
    raw = json.dumps(question(conversationId="\ud800"))  # ensure_ascii keeps the escape
    async with ws_connect(client) as ws:
        await ws.send_str(raw)
        assert_complete_answer(await frames_until_done(ws), "\ud800")
        await assert_heartbeat(ws)
    assert tracebacks(caplog) == []


async def test_two_thousand_frames_as_fast_as_possible_each_get_one_end_frame_and_heartbeats_still_work(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    total = 2000
    ends: dict[int, list[dict[str, Any]]] = {}

    async def read_until_all_ended(ws: ClientWebSocketResponse) -> None:
        while len(ends) < total:
            frame = await next_frame(ws, timeout=15)
            if frame["isDone"]:
                ends.setdefault(frame["conversationId"], []).append(frame)

    started = time.monotonic()
    async with ws_connect(client) as ws:
        reader = asyncio.create_task(read_until_all_ended(ws))
        for n in range(total):
            await ws.send_str(json.dumps(question(conversationId=n)))
        await asyncio.wait_for(reader, 20)
        await assert_heartbeat(ws)
        assert not ws.closed
    elapsed = time.monotonic() - started
    assert sorted(ends) == list(range(total)) and all(len(v) == 1 for v in ends.values())
    answered = [cid for cid, (end,) in ends.items() if end["isSuccess"]]
    refused = [cid for cid, (end,) in ends.items() if end["content"] == texts.WS_TOO_FAST]
    assert len(answered) + len(refused) == total
    # ws_per_minute 20 (a leaky bucket: 20 at once, then one every 3 s while this runs)
    assert 1 <= len(answered) <= 20 + math.ceil(elapsed / 3)
    assert tracebacks(caplog) == []


HOSTILE_BURST: list[str | bytes] = [
    "not json", "[1, 2]", "null", '"x"', "{", "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000, '"' + "x" * 900_000 + '"', b"\x00\x01", b"\xff" * 50_000,
    json.dumps(question(isDemo="yes")), json.dumps(question(messages="oops")), json.dumps(question(content=5)),
    json.dumps(question(conversationId={"a": [1]})), json.dumps(question(messages=[1, 2])),
    json.dumps(question()), json.dumps(question(messages=[{"role": "user", "content": "问" * 300_000}]),
                                       ensure_ascii=False),
]


async def test_after_a_hostile_burst_memory_sockets_and_tasks_return_to_baseline(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    app = client.server.app
    async with ws_connect(client) as ws:  # warm up: the limiter, quota and renderer exist now
        await ws.send_str(json.dumps(question()))
        await frames_until_done(ws)
        await assert_heartbeat(ws)
    await wait_until(lambda: len(app[sockets_key]) == 0)
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        replies = 0
        async with ws_connect(client) as ws:
            for _ in range(10):
                for item in HOSTILE_BURST:
                    await (ws.send_bytes(item) if isinstance(item, bytes) else ws.send_str(item))
                    replies += len(await frames_until_done(ws))
            await assert_heartbeat(ws)
            assert len(app[sockets_key]) == 1
        await wait_until(lambda: len(app[sockets_key]) == 0 and len(asyncio.all_tasks()) <= tasks_before)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert replies >= 10 * len(HOSTILE_BURST)
    assert after - before < 5 * 1024 * 1024, f"{(after - before) / 1e6:.1f} MB still held"
    assert tracebacks(caplog) == []


# --- hostile HTTP: bodies ---------------------------------------------------------------------------

@pytest.fixture
async def http_client(make_client: MakeClient) -> TestClient:
    """The app with the HTTP limits out of the way, so each hostile request reaches its handler."""
    return await make_client(**SERVE_FREELY)


EMPTY_BODIES = [b"", b"   \r\n\t"]
NOT_JSON_BODIES = [b"not json", b"{", b"[1, 2]", b'"sk-x"', b"null", b"42", b"[" * 100_000 + b"]" * 100_000,
                   b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b'{"apiKey": "\xff\xfe"}', b"\x00" * 10]
VERIFY_PATHS = ["/api/auth/apikey/verify", "//api/auth/apikey/verify", "//api1/auth/apikey/verify"]


@pytest.mark.parametrize("path", VERIFY_PATHS)
@pytest.mark.parametrize("body", EMPTY_BODIES, ids=["empty", "blank"])
async def test_an_empty_body_on_a_mini_program_route_is_envelope_200001(
        http_client: TestClient, caplog: pytest.LogCaptureFixture, path: str, body: bytes) -> None:
    response = await http_client.session.post(url(http_client, path), data=body)
    assert response.status == 200
    assert envelope_of(await response.read()) == {"status": "200001", "msg": texts.BODY_EMPTY}
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("path", VERIFY_PATHS)
@pytest.mark.parametrize("body", NOT_JSON_BODIES, ids=["text", "truncated", "array", "string", "null", "number",
                                                       "deep-arrays", "deep-objects", "bad-utf8", "nul-bytes"])
async def test_a_body_that_is_not_a_json_object_on_a_mini_program_route_is_envelope_200002(
        http_client: TestClient, caplog: pytest.LogCaptureFixture, path: str, body: bytes) -> None:
    response = await http_client.session.post(url(http_client, path), data=body)
    assert response.status == 200
    assert envelope_of(await response.read()) == {"status": "200002", "msg": texts.BODY_NOT_JSON}
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations", "/chat"])
@pytest.mark.parametrize("body", [*EMPTY_BODIES, *NOT_JSON_BODIES])
async def test_an_empty_or_malformed_body_on_an_http_api_route_is_a_400_openai_error(
        http_client: TestClient, caplog: pytest.LogCaptureFixture, path: str, body: bytes) -> None:
    response = await http_client.session.post(url(http_client, path), data=body)
    assert response.status == 400
    try:
        parsed = json.loads(body) if body.strip() else None
        message = "The request body must be a JSON object."
    except (ValueError, RecursionError):
        parsed, message = None, "We could not parse the JSON body of your request."
    assert not isinstance(parsed, dict)
    assert strict_json((await response.read()).decode()) == openai_error(message)
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_size_limit_is_a_413_openai_error(
        http_client: TestClient, caplog: pytest.LogCaptureFixture, path: str, chunked: bool) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b"x" * 65536  # 17 × 64 KiB = 1 MiB + 64 KiB, no Content-Length

    data: Any = chunks() if chunked else io.BytesIO(b"x" * (MAX_BYTES + 1))
    response = await http_client.session.post(url(http_client, path), data=data)
    assert response.status == 413
    assert strict_json((await response.read()).decode()) == openai_error("Request body too large.")
    assert tracebacks(caplog) == []


async def test_a_body_over_the_size_limit_on_verify_is_an_envelope_error(
        http_client: TestClient, caplog: pytest.LogCaptureFixture, fake: FakeOpenAI) -> None:
    response = await http_client.session.post(url(http_client, "//api/auth/apikey/verify"),
                                              data=io.BytesIO(b"x" * (MAX_BYTES + 1)))
    assert response.status == 200
    assert envelope_of(await response.read()) == {"status": "200002", "msg": "Request body too large."}
    assert fake.requests == []
    assert tracebacks(caplog) == []


async def test_a_body_of_exactly_the_size_limit_is_read(http_client: TestClient) -> None:
    body = b'{"apiKey": "sk-x", "pad": "' + b"x" * (MAX_BYTES - 29) + b'"}'
    assert len(body) == MAX_BYTES
    response = await http_client.session.post(url(http_client, "//api/auth/apikey/verify"), data=io.BytesIO(body))
    assert envelope_of(await response.read()) == {"status": "000000", "msg": "SUCCESS"}


# --- hostile HTTP: content types ----------------------------------------------------------------------

KEY_BODY = b'{"apiKey": "sk-user-1234"}'


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "application/json; charset=latin-1", "image/png"])
async def test_verify_reads_the_raw_body_as_json_whatever_the_content_type_says(
        http_client: TestClient, content_type: str | None) -> None:
    headers = () if content_type is None else (f"Content-Type: {content_type}",)
    status, _, body = await raw_http(http_client, http_request("POST", "//api/auth/apikey/verify", *headers,
                                                               body=KEY_BODY))
    assert status == 200
    assert envelope_of(body) == {"status": "000000", "msg": "SUCCESS"}


async def test_a_multipart_or_form_body_is_not_json(http_client: TestClient, fake: FakeOpenAI) -> None:
    multipart = aiohttp.MultipartWriter("form-data")
    multipart.append_json({"apiKey": "sk-user-1234"})
    for data in (multipart, {"apiKey": "sk-user-1234"}):
        response = await http_client.session.post(url(http_client, "//api/auth/apikey/verify"), data=data)
        assert envelope_of(await response.read()) == {"status": "200002", "msg": texts.BODY_NOT_JSON}
    multipart = aiohttp.MultipartWriter("form-data")
    multipart.append_json({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    response = await http_client.session.post(url(http_client, "/v1/chat/completions"), data=multipart)
    assert response.status == 400
    assert await response.json() == openai_error("We could not parse the JSON body of your request.")
    assert fake.requests == []


async def test_a_v1_request_with_json_sent_as_text_plain_is_answered(http_client: TestClient) -> None:
    body = json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    response = await http_client.session.post(url(http_client, "/v1/chat/completions"), data=body,
                                              headers={"Content-Type": "text/plain"})
    assert response.status == 200
    assert (await response.json())["choices"][0]["message"]["content"] == FAKE_TEXT


# --- hostile HTTP: headers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "status"), [
    ((f"X-Big: {'a' * 9000}",), 400),  # over aiohttp's 8190-byte field limit
    ((f"X-Big: {'a' * 8100}",), 200),  # just under it
    (tuple(f"X-H{n}: v" for n in range(200)), 400),  # over aiohttp's 128 headers
    (tuple(f"X-H{n}: v" for n in range(100)), 200),
    (("X-Real-IP: " + "1" * 5000,), 200),  # garbage forwarded address from the trusted peer
    (("X-Forwarded-For: " + "1.2.3.4, " * 700,), 200),
    (("Authorization: Bearer \x00\x01",), 400),  # control characters: refused by the parser
    (("Authorization: Bearer " + "k" * 10240,), 400),  # a 10 KB bearer is over the field limit
], ids=["huge-header", "large-header", "200-headers", "100-headers", "garbage-real-ip", "long-forwarded-for",
        "control-chars-auth", "10KB-bearer"])
async def test_header_tricks_are_answered_by_aiohttp_or_the_route_never_500(
        http_client: TestClient, headers: tuple[str, ...], status: int) -> None:
    got, _, body = await raw_http(http_client, http_request("GET", "//status", *headers))
    assert got == status, body
    if status == 200:
        assert envelope_of(body) == {"status": "000000", "msg": "SUCCESS", "state": True}


@pytest.mark.parametrize("authorization", ["Basic xyz", "Bearer", "Bearer    ", "bearer\tx", "Bearer \u00e9\u00e8"])
async def test_odd_authorization_on_the_backend_api_is_the_unsupported_envelope(
        http_client: TestClient, authorization: str) -> None:
    status, _, body = await raw_http(http_client, http_request("GET", "//backend-api/conversations",
                                                               f"Authorization: {authorization}"))
    assert status == 200
    assert envelope_of(body) == {"status": "500001", "msg": texts.TOKEN_UNSUPPORTED}


@pytest.mark.parametrize(("authorization", "upstream_sees"), [
    ("Basic xyz", f"Bearer {SERVER_KEY}"),  # not a bearer: anonymous, the server's pool pays
    ("Bearer    ", f"Bearer {SERVER_KEY}"),
    ("Bearer " + "k" * 8000, "Bearer " + "k" * 8000),  # near the header limit: the caller's own key
])
async def test_odd_authorization_on_v1_follows_the_who_pays_rule(
        http_client: TestClient, fake: FakeOpenAI, authorization: str, upstream_sees: str) -> None:
    body = json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, answer = await raw_http(http_client, http_request(
        "POST", "/v1/chat/completions", f"Authorization: {authorization}", body=body))
    assert status == 200
    assert strict_json(answer.decode())["choices"][0]["message"]["content"] == FAKE_TEXT
    assert [r.authorization for r in fake.chat_requests()] == [upstream_sees]


# --- hostile HTTP: paths and methods --------------------------------------------------------------------

@pytest.mark.parametrize(("path", "status"), [
    ("//", 200), ("///status", 200), ("/" * 7000 + "status", 200), ("/./status", 404),
    ("/res/%2e%2e%2fapp.py", 404), ("/res/..%2F..%2Fapp.py", 404), ("/res/../../app.py", 404),
    ("/res/..%5capp.py", 404), ("/res/%2e%2e", 404), ("/res/%00.png", 404), ("/%2e%2e/%2e%2e/app.py", 404),
    ("/status%00", 404), ("/status?" + "a=1&" * 1000, 200),
    ("/" + "a" * 7000, 404),  # long but under aiohttp's 8190-byte request line: not found
    ("/" + "a" * 10240, 400),  # over the request-line limit: aiohttp answers 400 (not 414)
])
async def test_path_tricks_are_served_or_not_found_never_500(
        http_client: TestClient, path: str, status: int) -> None:
    got, _, body = await raw_http(http_client, http_request("GET", path))
    assert got == status, body[:200]
    if status == 200:
        assert envelope_of(body)["status"] == "000000"


@pytest.mark.parametrize("path", ["/status", "//status", "//announcement"])
@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
async def test_an_unsupported_method_is_405(http_client: TestClient, path: str, method: str) -> None:
    status, headers, _ = await raw_http(http_client, http_request(method, path))
    assert (status, headers["Allow"]) == (405, "GET,HEAD")


# --- hostile HTTP: slow clients ---------------------------------------------------------------------------

async def timed_status(client: TestClient) -> float:
    """Seconds another client waits for `GET //status` (which must succeed)."""
    started = time.monotonic()
    response = await client.session.get(url(client, "//status"))
    assert envelope_of(await response.read())["status"] == "000000"
    return time.monotonic() - started


async def test_a_client_that_sends_half_a_body_and_stops_does_not_hold_up_anyone_else(
        http_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    stalled = []
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection(http_client.host, http_client.port)
            writer.write(b"POST //api/auth/apikey/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n" + b'{"apiKey":')
            await writer.drain()
            stalled.append((reader, writer))
        assert await timed_status(http_client) < 1.0
        for reader, _ in stalled:  # still waiting for the rest of their bodies: nothing answered yet
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.05)
    finally:
        for _, writer in stalled:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    assert await timed_status(http_client) < 1.0
    assert tracebacks(caplog) == []


async def test_a_client_that_sends_half_a_request_line_does_not_hold_up_anyone_else(
        http_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    stalled = []
    try:
        for n in range(50):
            reader, writer = await asyncio.open_connection(http_client.host, http_client.port)
            writer.write(b"GET /sta" if n % 2 else b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            await writer.drain()
            stalled.append((reader, writer))
        assert await timed_status(http_client) < 1.0
    finally:
        for _, writer in stalled:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    assert tracebacks(caplog) == []


# --- hostile HTTP: text the server cannot encode, and logs -----------------------------------------------

async def test_a_lone_surrogate_in_a_v1_model_name_is_a_404_openai_error_not_a_500(
        http_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    response = await http_client.session.post(url(http_client, "/v1/chat/completions"), data=body)
    assert response.status == 404
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert tracebacks(caplog) == []


async def test_a_lone_surrogate_in_a_chat_prompt_does_not_stop_the_state_file_being_written(
        http_client: TestClient) -> None:
    response = await http_client.session.post(url(http_client, "/chat"),
                                              data=b'{"content": "\\ud800 hi", "conversationId": "c-s"}')
    assert (response.status, await response.text()) == (200, FAKE_TEXT + "\n")
    state = http_client.server.app[state_key]
    assert await state.save() is True  # raises UnicodeEncodeError when the snapshot cannot be encoded
    saved = json.loads(state.path.read_text(encoding="utf-8"))
    assert saved["chat"][response.headers["X-Conversation-Id"]]["turns"] == [["\ud800 hi", FAKE_TEXT]]


async def test_malformed_http_requests_are_refused_without_a_traceback_in_the_log(
        http_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    # Scanners send these all day to anything on the internet; each must not cost a logged traceback.
    for request in (http_request("GET", "/" + "a" * 10240), http_request("GET", "/status", "X-Big: " + "a" * 9000),
                    http_request("GET", "/status", "Authorization: Bearer \x00\x01"),
                    http_request("GET", "/\xff\xfe")):
        assert (await raw_http(http_client, request))[0] == 400
    assert tracebacks(caplog) == []
