"""`/v1/*` (PROTOCOL.md B.1) against the real app: byte-exact SSE, who pays, OpenAI errors, the SDK."""
from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import openai
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from tests.conftest import CLIENT_TOKEN, SERVER_KEY, USER_KEY, MakeClient
from tests.fakes.openai import Fail, FakeOpenAI, Stream

FAKE_TEXT = "Hello, **world**!"
ERROR_KEYS = {"message", "type", "param", "code"}


def chat_body(**fields: Any) -> dict[str, Any]:
    """A minimal chat completion request, as curl or an SDK sends it."""
    body: dict[str, Any] = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body that must be exactly `data: <payload>\\n\\n` events."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = raw[:-2].split(b"\n\n")
    payloads: list[Any] = []
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        data = event.removeprefix(b"data: ").decode("utf-8")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def openai_error(response: ClientResponse, status: int) -> dict[str, Any]:
    """Check an answer is OpenAI's error JSON with `status`; return its `error` object."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- streamed and plain answers -------------------------------------------------------------------

async def test_streamed_completion_is_byte_exact_sse_ending_with_done(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = sse_events(await response.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == "chatcmpl-fake-1"
        assert chunk["model"] == "gpt-3.5-turbo"
        assert isinstance(chunk["created"], int)
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0
        assert isinstance(chunk["choices"][0]["delta"], dict)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == FAKE_TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert len(fake.chat_requests()) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_upstream_is_asked_to_stream_the_callers_messages_with_their_usage(
        client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Again"}]
    response = await client.post("/v1/chat/completions", json=chat_body(messages=history, stream=stream))
    assert response.status == 200
    await response.read()
    sent = fake.chat_requests()[0].body
    # Always streamed (a plain answer is assembled from the stream): the same timeouts on every door.
    assert sent["stream"] is True
    assert sent["model"] == "gpt-3.5-turbo"
    assert sent["messages"] == history
    assert sent["stream_options"] == {"include_usage": True}  # the server counts tokens


async def test_plain_completion_is_one_chat_completion_object(client: TestClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-fake-1"
    assert body["model"] == "gpt-3.5-turbo"
    # Assembled from the upstream's chunks, every field of them: usage, system_fingerprint...
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": FAKE_TEXT},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert body["system_fingerprint"] == "fp_fake"


async def test_models_lists_the_configured_models_in_openai_list_shape(make_client: MakeClient) -> None:
    client = await make_client(upstream={"models": ["gpt-3.5-turbo", "gpt-4o-mini"]})
    response = await client.get("/v1/models")
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["gpt-3.5-turbo", "gpt-4o-mini"]
    assert all(m["object"] == "model" for m in body["data"])


# --- who pays --------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer ", f"Bearer {CLIENT_TOKEN}"],
                         ids=["no-header", "bare-bearer", "bearer-space", "client-token"])
async def test_anonymous_and_trusted_callers_are_paid_by_the_server_key(
        client: TestClient, fake: FakeOpenAI, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert response.status == 200, await response.text()
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {SERVER_KEY}"]


async def test_a_users_own_key_is_passed_through_unchanged(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True),
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    assert response.status == 200
    await response.read()
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {USER_KEY}"]


async def test_a_users_own_key_may_ask_for_any_model(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(model="my-fine-tune-1"),
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    assert response.status == 200
    assert (await response.json())["model"] == "my-fine-tune-1"
    assert fake.chat_requests()[0].body["model"] == "my-fine-tune-1"


async def test_an_unlisted_model_on_the_pool_is_404_model_not_found_without_upstream_request(
        client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4-32k"),
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    error = await openai_error(response, 404)
    assert error["code"] == "model_not_found"
    assert fake.chat_requests() == []


# --- request validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{not json", b'[{"role": "user", "content": "Hi"}]', b'"text"', b""],
                         ids=["not-json", "a-list", "a-string", "empty"])
async def test_a_body_that_is_not_a_json_object_is_400(client: TestClient, fake: FakeOpenAI, raw: bytes) -> None:
    response = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    error = await openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert fake.chat_requests() == []


@pytest.mark.parametrize("fields", [
    {"messages": None}, {"messages": []}, {"messages": "Hi"}, {"messages": [{"content": "no role"}]},
    {"stream": "yes"}, {"temperature": 5}, {"temperature": "hot"}, {"n": 2}, {"max_tokens": 0},
], ids=["no-messages", "empty-messages", "string-messages", "roleless-message", "stream-yes",
        "temperature-5", "temperature-string", "n-2", "max-tokens-0"])
async def test_an_invalid_field_is_400_in_openai_error_shape(client: TestClient, fake: FakeOpenAI,
                                                            fields: dict[str, Any]) -> None:
    body = chat_body(**fields)
    if fields.get("messages", "") is None:
        del body["messages"]
    response = await client.post("/v1/chat/completions", json=body)
    error = await openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert fake.chat_requests() == []


async def test_a_body_over_the_size_limit_is_413(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(ws={"max_message_bytes": 2048})
    body = chat_body(messages=[{"role": "user", "content": "x" * 10_000}])
    response = await client.post("/v1/chat/completions", json=body)
    await openai_error(response, 413)
    assert fake.chat_requests() == []


# --- upstream failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_upstream_401_on_the_own_key_is_401_with_the_upstreams_message(
        client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    fake.script.append(Fail(401, "Incorrect API key provided: sk-user***9999.", code="invalid_api_key"))
    response = await client.post("/v1/chat/completions", json=chat_body(stream=stream),
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    error = await openai_error(response, 401)
    assert error["message"] == "Incorrect API key provided: sk-user***9999."
    assert error["code"] == "invalid_api_key"
    assert len(fake.chat_requests()) == 1


async def test_upstream_429_on_the_own_key_is_429(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Fail(429, "Rate limit reached for requests.", code="rate_limit_exceeded"))
    response = await client.post("/v1/chat/completions", json=chat_body(),
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    error = await openai_error(response, 429)
    assert error["message"] == "Rate limit reached for requests."
    assert len(fake.chat_requests()) == 1


async def test_upstream_429_retry_after_reaches_the_caller(client: TestClient, fake: FakeOpenAI) -> None:
    # PROTOCOL.md B.1: a 429 carries Retry-After; the upstream's own hint is the one worth passing on.
    fake.script.append(Fail(429, "Rate limit reached for requests.", headers={"Retry-After": "7"}))
    response = await client.post("/v1/chat/completions", json=chat_body(),
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    await openai_error(response, 429)
    assert response.headers.get("Retry-After") == "7"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_upstream_500_is_502_with_the_upstreams_message_before_any_text(
        client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    fake.script.append(Fail(500, "The server had an error while processing your request."))
    response = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    error = await openai_error(response, 502)
    assert error["message"] == "The server had an error while processing your request."
    assert len(fake.chat_requests()) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_an_unreachable_upstream_is_502(make_client: MakeClient, stream: bool) -> None:
    client = await make_client(upstream={"base_url": "http://127.0.0.1:9/v1"})
    response = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
    error = await openai_error(response, 502)
    assert error["message"] == "Could not reach the upstream at 127.0.0.1."


async def test_a_stream_that_drops_mid_answer_ends_with_an_error_event_and_one_upstream_post(
        client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(done=False))
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = sse_events(await response.read())
    assert "[DONE]" not in events
    chunks, last = events[:-1], events[-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == FAKE_TEXT
    assert set(last) == {"error"}
    assert set(last["error"]) == ERROR_KEYS
    assert last["error"]["message"] == "The upstream at 127.0.0.1 broke off its answer or sent something unreadable."
    await asyncio.sleep(0.3)  # a reconnecting SSE client would re-POST here
    assert len(fake.chat_requests()) == 1


# --- the official openai SDK -----------------------------------------------------------------------

async def test_openai_sdk_streams_completes_and_lists_models(client: TestClient, fake: FakeOpenAI) -> None:
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=CLIENT_TOKEN, max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}], stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
        assert "".join(pieces) == FAKE_TEXT
        completion = await sdk.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}])
        assert completion.id == "chatcmpl-fake-1"
        assert completion.choices[0].message.content == FAKE_TEXT
        assert completion.choices[0].finish_reason == "stop"
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["gpt-3.5-turbo"]
    finally:
        await sdk.close()
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {SERVER_KEY}"] * 2


async def test_openai_sdk_raises_authentication_error_with_the_upstreams_message(
        client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Fail(401, "Incorrect API key provided: sk-user***9999.", code="invalid_api_key"))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=USER_KEY, max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model="gpt-3.5-turbo",
                                              messages=[{"role": "user", "content": "Hi"}], stream=True)
    finally:
        await sdk.close()
    assert caught.value.status_code == 401
    assert caught.value.body == {"message": "Incorrect API key provided: sk-user***9999.",
                                 "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    assert caught.value.code == "invalid_api_key"


# --- the offline provider --------------------------------------------------------------------------

async def test_offline_provider_streams_the_canned_answer_without_any_upstream_request(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": []})
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    events = sse_events(await response.read())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(pieces) > 3
    assert "".join(pieces) == texts.OFFLINE_ANSWER
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fake.requests == []


async def test_a_long_streamed_answer_to_a_client_that_reads_slowly_arrives_whole_and_in_order(
        client: TestClient, fake: FakeOpenAI) -> None:
    # About 1.4 MB: more than the socket buffers and the server's backlog of queued body bytes hold, so
    # the answer has to wait for the client and write what was queued meanwhile in order.
    pieces = [f"{n:05d}" + "x" * 2000 for n in range(700)]
    fake.script.append(Stream(pieces=pieces))
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    await asyncio.sleep(0.5)  # not reading: the server's writes back up
    raw = bytearray()
    while chunk := await response.content.read(256 * 1024):
        raw += chunk
        await asyncio.sleep(0.001)
    events = sse_events(bytes(raw))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == "".join(pieces)


async def _arrivals(client: TestClient) -> list[tuple[float, str]]:
    """Each network read of a streamed answer: when it arrived and the answer text it carried."""
    loop = asyncio.get_running_loop()
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    reads: list[tuple[float, bytes]] = []
    async for data in response.content.iter_any():
        reads.append((loop.time(), data))
    events = sse_events(b"".join(data for _, data in reads))
    assert events[-1] == "[DONE]"
    texts_of = []
    for at, data in reads:
        chunks = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
        texts_of.append((at, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])))
    return texts_of


@pytest.mark.parametrize("interval_ms", [0, 150])
async def test_a_streamed_answer_is_written_at_most_once_per_stream_interval(
        make_client: MakeClient, fake: FakeOpenAI, interval_ms: int) -> None:
    # Twelve tokens 25 ms apart: one write each without an interval; with 150 ms, the first at once and
    # the rest gathered into a write per interval (what arrived meanwhile comes out of one read).
    pieces = [f"t{n} " for n in range(12)]
    fake.script.append(Stream(pieces=pieces, delay=0.025))
    client = await make_client(server={"stream_interval_ms": interval_ms})
    started = asyncio.get_running_loop().time()
    reads = await _arrivals(client)
    assert "".join(text for _, text in reads) == "".join(pieces)
    assert reads[0][1].startswith("t0 ")
    assert reads[0][0] - started < 0.1  # the first token is never held back
    with_text = [(at, text) for at, text in reads if text]
    if interval_ms == 0:
        assert len(with_text) >= 10  # the fake really paces its tokens: a read each
    else:
        assert len(with_text) <= 5  # ~330 ms of tokens: the first, then one write per 150 ms
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(with_text)]
        assert min(gaps) > 0.12
