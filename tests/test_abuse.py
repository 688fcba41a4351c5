"""Abuse and cost control through the real app over real sockets: limits, quota, key pool, cancel, Baixing."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.client import ClientWebSocketResponse
from aiohttp.test_utils import TestClient, TestServer

from chatgpt.domain import texts
from chatgpt.domain.keypool import probe_forever
from chatgpt.faces.markdown import to_html
from chatgpt.keys import pipeline_key, routes_key, upstream_key
from tests.conftest import CLIENT_TOKEN, USER_KEY, MakeClient, url, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer
from tests.helpers.timewarp import skip

EVENT_LOOP = "warp"  # the HTTP limit's recovery is shown by moving the loop's clock, not by waiting

KEY_A = "sk-key-aaaa1111"
KEY_B = "sk-key-bbbb2222"
FAKE_TEXT = "Hello, **world**!"  # what the fake upstream answers by default
# What an SDK or curl user reads when the daily quota is used up (English on /v1 and /chat, PROTOCOL.md E.2).
QUOTA_USED_UP = ("Today's free questions from your address are used up; they come back at midnight "
                 "(or send your own API key as the bearer token).")


def chat_body(**fields: Any) -> dict[str, Any]:
    """A minimal /v1 chat completion request."""
    body: dict[str, Any] = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


def refusal(text: str, created: str, cid: Any = "c-1") -> dict[str, Any]:
    """The exact error / refusal frame of PROTOCOL.md A.3."""
    return {"conversationId": cid, "role": "assistant", "content": text, "html": to_html(text),
            "createTime": created, "isDone": True, "isSuccess": False}


async def ask(ws: ClientWebSocketResponse, prompt: str = "你好", **fields: Any) -> list[dict[str, Any]]:
    """Send one question and return its frames up to the one with isDone true."""
    await ws.send_json(question(prompt, **fields))
    return await receive_answer(ws)


async def remaining(ws: ClientWebSocketResponse) -> str:
    """Ask `查询次数` and return the quota frame's content (checking the frame's exact shape)."""
    frames = await ask(ws, texts.QUOTA_QUERY)
    assert len(frames) == 1
    frame = frames[0]
    assert frame == {"conversationId": "c-1", "content": frame["content"], "html": frame["content"],
                     "createTime": frame["createTime"], "isDone": True, "isSuccess": False}
    return frame["content"]


def answered(frames: list[dict[str, Any]]) -> bool:
    """True when a question got text and then the one DONE frame."""
    return (len(frames) >= 2 and frames[-1]["content"] == "DONE" and frames[-1]["isSuccess"] is True
            and all(f["isSuccess"] is True and f["isDone"] is False for f in frames[:-1]))


def ip(address: str) -> dict[str, str]:
    """Headers a proxy in front of the server would add."""
    return {"X-Real-IP": address}


# --- HTTP rate limits ------------------------------------------------------------------------------

async def test_http_limit_refuses_the_third_rapid_request_with_envelope_700001_then_recovers(
        make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 2})
    bodies = []
    for _ in range(3):
        response = await client.session.get(url(client, "//status"), headers=ip("10.0.0.1"))
        assert response.status == 200
        bodies.append(await response.json())
    assert [b["status"] for b in bodies] == ["000000", "000000", "700001"]
    assert bodies[2] == {"status": "700001", "msg": texts.HTTP_TOO_FAST, "timestamp": bodies[2]["timestamp"]}
    other = await (await client.session.get(url(client, "//status"), headers=ip("10.0.0.2"))).json()
    assert (other["status"], other["state"]) == ("000000", True)
    skip(0.6)  # 2/s drains one request's worth every 0.5 s
    again = await (await client.session.get(url(client, "//status"), headers=ip("10.0.0.1"))).json()
    assert (again["status"], again["state"]) == ("000000", True)


async def test_v1_limit_refusal_is_429_with_retry_after_and_openai_error_json(make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 2})
    statuses = []
    for _ in range(3):
        response = await client.get("/v1/models", headers=ip("10.0.0.1"))
        statuses.append(response.status)
    assert statuses == [200, 200, 429]
    assert response.headers["Retry-After"] == "1"
    assert await response.json() == {"error": {"message": "Too many requests from your address; retry in 1 s.",
                                               "type": "rate_limit_exceeded", "param": None,
                                               "code": "rate_limit_exceeded"}}


async def test_spoofed_forwarding_headers_from_an_untrusted_peer_do_not_dodge_the_http_limit(
        make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 2}, server={"trusted_proxies": []})
    codes = []
    for n in range(3):
        headers = {"X-Real-IP": f"10.9.0.{n}", "X-Forwarded-For": f"10.8.0.{n}"}
        codes.append((await (await client.session.get(url(client, "//status"), headers=headers)).json())["status"])
    assert codes == ["000000", "000000", "700001"]


async def test_forwarding_headers_from_a_trusted_proxy_give_each_client_its_own_http_limit(
        make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 2})
    codes = []
    for n in range(3):
        headers = {"X-Forwarded-For": f"10.8.0.{n}"}
        codes.append((await (await client.session.get(url(client, "//status"), headers=headers)).json())["status"])
    assert codes == ["000000", "000000", "000000"]


# --- websocket rate limit ----------------------------------------------------------------------------

async def test_websocket_limit_refuses_the_third_question_and_keeps_the_socket_and_heartbeats(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(limits={"ws_per_minute": 2})
    async with ws_connect(client) as ws:
        assert answered(await ask(ws))
        assert answered(await ask(ws))
        third = await ask(ws)
        assert third == [refusal(texts.WS_TOO_FAST, third[0]["createTime"])]
        for _ in range(20):
            await ws.send_json({"heart": "ping"})
        pongs = [await asyncio.wait_for(ws.receive_json(), 5) for _ in range(20)]
        assert [p["heart"] for p in pongs] == ["pong"] * 20
        assert not ws.closed
    assert len(fake.chat_requests()) == 2


@pytest.mark.parametrize(("trusted", "second_is_answered"), [([], False), (["127.0.0.1", "::1"], True)])
async def test_forwarding_headers_set_the_websocket_identity_only_from_a_trusted_peer(
        make_client: MakeClient, trusted: list[str], second_is_answered: bool) -> None:
    client = await make_client(limits={"ws_per_minute": 2}, server={"trusted_proxies": trusted})
    async with ws_connect(client, headers=ip("10.1.1.1")) as ws:
        assert answered(await ask(ws))
        assert answered(await ask(ws))
    headers = {"X-Real-IP": "10.2.2.2", "X-Forwarded-For": "10.3.3.3"}
    async with ws_connect(client, headers=headers) as ws:
        frames = await ask(ws)
    if second_is_answered:
        assert answered(frames)
    else:
        assert frames == [refusal(texts.WS_TOO_FAST, frames[0]["createTime"])]


# --- daily quota -----------------------------------------------------------------------------------------

async def test_daily_quota_counts_both_sender_modes_and_refuses_the_third_question(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 2})
    async with ws_connect(client) as ws:
        assert await remaining(ws) == "2"
        assert answered(await ask(ws, isSender=False))
        assert await remaining(ws) == "1"
        assert answered(await ask(ws, isSender=True))
        assert await remaining(ws) == "0"
        third = await ask(ws)
        assert third == [refusal(texts.QUOTA_USED_UP, third[0]["createTime"])]
        assert await remaining(ws) == "0"
    assert len(fake.chat_requests()) == 2


async def test_a_question_on_the_users_own_key_is_not_limited_by_the_daily_quota(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 1})
    async with ws_connect(client) as ws:
        assert answered(await ask(ws))
        refused = await ask(ws)
        assert refused == [refusal(texts.QUOTA_USED_UP, refused[0]["createTime"])]
        for _ in range(2):
            assert answered(await ask(ws, isDemo=False, authValue=f"Bearer {USER_KEY}"))
        assert await remaining(ws) == "0"
    assert [r.authorization for r in fake.chat_requests()][1:] == [f"Bearer {USER_KEY}"] * 2


async def test_an_upstream_failure_before_any_text_gives_the_question_back(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 2})
    fake.script.append(Fail(500, "upstream exploded"))
    async with ws_connect(client) as ws:
        frames = await ask(ws)
        assert frames == [refusal("upstream exploded", frames[0]["createTime"])]
        assert await remaining(ws) == "2"
    assert len(fake.chat_requests()) == 1


async def test_a_stream_that_broke_after_some_text_is_charged(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 2})
    fake.script.append(Stream(pieces=["partial"], done=False))
    async with ws_connect(client) as ws:
        frames = await ask(ws)
        assert frames[0]["content"] == "partial"
        assert frames[-1] == refusal(texts.UPSTREAM_FAILED, frames[-1]["createTime"])
        assert await remaining(ws) == "1"


async def test_anonymous_v1_requests_share_the_websocket_quota_and_client_tokens_do_not_use_it(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 2})
    who = ip("10.0.0.7")
    async with ws_connect(client, headers=who) as ws:
        assert answered(await ask(ws))
        first = await client.post("/v1/chat/completions", json=chat_body(), headers=who)
        assert first.status == 200
        assert (await first.json())["choices"][0]["message"]["content"] == FAKE_TEXT
        assert await remaining(ws) == "0"
        refused = await ask(ws)
        assert refused == [refusal(texts.QUOTA_USED_UP, refused[0]["createTime"])]
    for headers in (who, {**who, "Authorization": "Bearer "}):
        over = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert over.status == 429
        assert await over.json() == {"error": {"message": QUOTA_USED_UP, "type": "insufficient_quota",
                                               "param": None, "code": "daily_quota_exceeded"}}
    trusted = await client.post("/v1/chat/completions", json=chat_body(),
                                headers={**who, "Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert trusted.status == 200
    assert (await trusted.json())["choices"][0]["message"]["content"] == FAKE_TEXT
    assert len(fake.chat_requests()) == 3


# --- the server's key pool ---------------------------------------------------------------------------------

async def test_successive_questions_alternate_between_the_server_keys(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A, KEY_B]})
    async with ws_connect(client) as ws:
        for _ in range(4):
            assert answered(await ask(ws))
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {k}" for k in (KEY_A, KEY_B, KEY_A, KEY_B)]


async def test_a_401_key_is_retried_once_on_the_next_key_and_then_skipped(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A, KEY_B]})
    fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    async with ws_connect(client) as ws:
        frames = await ask(ws)
        assert answered(frames) and frames[-2]["content"] == FAKE_TEXT
        assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]
        for _ in range(2):
            assert answered(await ask(ws))
    assert [r.authorization for r in fake.chat_requests()][2:] == [f"Bearer {KEY_B}"] * 2


async def test_a_429_with_retry_after_cools_that_key_and_the_other_key_answers(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A, KEY_B]})
    fake.script.append(Fail(429, "Rate limit reached.", headers={"Retry-After": "30"}))
    async with ws_connect(client) as ws:
        for _ in range(3):
            assert answered(await ask(ws))
    assert [r.authorization for r in fake.chat_requests()] == [
        f"Bearer {KEY_A}", f"Bearer {KEY_B}", f"Bearer {KEY_B}", f"Bearer {KEY_B}"]


async def test_when_every_key_is_refused_the_user_gets_an_error_frame_after_at_most_two_posts(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A, KEY_B]})
    fake.default = Fail(401, "Incorrect API key provided.", code="invalid_api_key")
    async with ws_connect(client) as ws:
        frames = await ask(ws)
        # A refusal of the server's own key is the operator's business: the user gets the generic
        # failure, never the upstream's message (it names the key or the organisation).
        assert frames == [refusal(texts.UPSTREAM_FAILED, frames[0]["createTime"])]
        assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {KEY_A}", f"Bearer {KEY_B}"]
        again = await ask(ws)  # both keys are disabled now: nothing is sent upstream
        assert len(again) == 1 and again[0]["isSuccess"] is False and again[0]["content"]
    assert len(fake.chat_requests()) == 2
    for frame in frames + again:
        assert KEY_A not in frame["content"] and KEY_B not in frame["content"]


# --- cancel on disconnect ------------------------------------------------------------------------------------

SLOW = Stream(pieces=["piece "] * 50, delay=0.05)


async def test_closing_the_websocket_mid_answer_cancels_the_upstream_at_once_and_charges_the_question(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 5})
    fake.script.append(SLOW)
    loop = asyncio.get_running_loop()
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        first = await asyncio.wait_for(ws.receive_json(), 5)
        assert (first["content"], first["isDone"]) == ("piece ", False)
        left = loop.time()
        await ws.close()
    await asyncio.wait_for(fake.disconnected.wait(), 0.5)
    assert loop.time() - left < 0.2
    assert fake.disconnects == 1
    await asyncio.sleep(0.1)  # a reconnecting SSE client would re-POST here; it must not
    assert len(fake.chat_requests()) == 1
    async with ws_connect(client) as ws:
        assert await remaining(ws) == "4"


async def test_closing_a_streamed_v1_response_mid_answer_cancels_the_upstream_and_charges_the_question(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 5})
    fake.script.append(SLOW)
    loop = asyncio.get_running_loop()
    who = ip("10.0.0.9")
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True), headers=who)
    assert response.status == 200
    received = b""
    while b'"content": "piece' not in received:  # read until some answer text has arrived
        received += await asyncio.wait_for(response.content.readany(), 5)
    assert received.startswith(b"data: ")
    left = loop.time()
    response.close()
    await asyncio.wait_for(fake.disconnected.wait(), 0.5)
    assert loop.time() - left < 0.2
    assert fake.disconnects == 1
    await asyncio.sleep(0.1)
    assert len(fake.chat_requests()) == 1
    async with ws_connect(client, headers=who) as ws:
        assert await remaining(ws) == "4"


# --- maintenance ----------------------------------------------------------------------------------------------

async def test_maintenance_flag_turns_status_false_and_refuses_questions_everywhere(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(runtime={"status": "FALSE"})
    body = await (await client.session.get(url(client, "//status"))).json()
    assert (body["status"], body["state"]) == ("000000", False)
    async with ws_connect(client) as ws:
        frames = await ask(ws)
    assert frames == [refusal(texts.MAINTENANCE, frames[0]["createTime"])]
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status == 503
    error = (await response.json())["error"]
    assert (error["message"], error["type"]) == ("The service is under maintenance; try again later.", "server_error")
    verify = await (await client.session.post(url(client, "//api/auth/apikey/verify"),
                                              json={"apiKey": USER_KEY})).json()
    assert (verify["status"], verify["msg"]) == ("700001", texts.MAINTENANCE)
    assert fake.requests == []


# --- Baixing relay ---------------------------------------------------------------------------------------------

class FakeBaixing:
    """A scripted Baixing relay: answers `POST /` with the queued JSON objects in order."""

    def __init__(self) -> None:
        self.answers: deque[dict[str, Any]] = deque()
        self.received: list[Any] = []
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post("/", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        answer = self.answers.popleft() if self.answers else {"code": 0, "data": "好", "message": "ok"}
        return web.json_response(answer)


@pytest.fixture
async def baixing(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeBaixing:
    """A running fake Baixing relay; its URL is `baixing.url`."""
    relay = FakeBaixing()
    server = await aiohttp_server(relay.app)
    relay.url = str(server.make_url("/"))
    return relay


async def baixing_client(make_client: MakeClient, relay: FakeBaixing, **overrides: Any) -> TestClient:
    """The app in debug mode, chat routed to the fake relay."""
    return await make_client(runtime={"isDebug": "TRUE"},
                             upstream={"baixing_url": relay.url, "baixing_key": "bx-key"}, **overrides)


async def test_baixing_gets_the_last_prompt_and_its_answer_is_one_text_frame_without_markers(
        make_client: MakeClient, fake: FakeOpenAI, baixing: FakeBaixing) -> None:
    client = await baixing_client(make_client, baixing)
    baixing.answers.append({"code": 0, "data": "答案[*]一", "message": "ok"})
    history = [{"role": "user", "content": "第一问"}, {"role": "assistant", "content": "第一答"},
               {"role": "user", "content": "第二问"}]
    async with ws_connect(client) as ws:
        frames = await ask(ws, messages=history)
    assert baixing.received == [{"p": "第二问", "k": "bx-key"}]
    assert len(frames) == 2
    text, done = frames
    assert text == {"conversationId": "c-1", "id": text["id"], "role": "assistant", "content": "答案一",
                    "html": to_html("答案一"), "createTime": text["createTime"], "isDone": False, "isSuccess": True}
    assert isinstance(text["id"], str) and text["id"]
    assert (done["content"], done["isDone"], done["isSuccess"]) == ("DONE", True, True)
    assert fake.requests == []


async def test_a_baixing_error_code_becomes_an_error_frame_with_its_message(
        make_client: MakeClient, baixing: FakeBaixing) -> None:
    client = await baixing_client(make_client, baixing)
    baixing.answers.append({"code": 1, "message": "余额不足"})
    async with ws_connect(client) as ws:
        frames = await ask(ws)
    assert frames == [refusal("余额不足", frames[0]["createTime"])]


async def test_the_baixing_quota_refuses_the_second_anonymous_question(
        make_client: MakeClient, baixing: FakeBaixing) -> None:
    client = await baixing_client(make_client, baixing, quota={"baixing_daily_questions": 1})
    async with ws_connect(client) as ws:
        assert answered(await ask(ws))
        refused = await ask(ws)
    assert refused == [refusal(texts.QUOTA_USED_UP, refused[0]["createTime"])]
    assert len(baixing.received) == 1



async def test_a_disabled_server_key_is_reprobed_with_get_models_and_comes_back_when_it_works(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A]})
    keys = client.app[routes_key].upstreams[0].keys
    fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    async with ws_connect(client) as ws:
        assert (await ask(ws))[-1]["isSuccess"] is False
    assert [row["state"] for row in keys.health()] == ["disabled"]
    upstream = client.app[upstream_key]
    fake.valid_keys = {"sk-some-other-key"}  # the upstream still refuses KEY_A
    probe = asyncio.create_task(probe_forever(keys, upstream.key_works, every=0.02))
    try:
        keys.probe_interval = 0  # due at once instead of after 10 minutes
        await asyncio.sleep(0.1)
        assert [row["state"] for row in keys.health()] == ["disabled"]
        fake.valid_keys = {KEY_A}  # the operator topped the account up
        await asyncio.sleep(0.1)
        assert [row["state"] for row in keys.health()] == ["healthy"]
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    probes = [r for r in fake.requests if r.path.endswith("/models")]
    assert probes and all(r.authorization == f"Bearer {KEY_A}" for r in probes)
    async with ws_connect(client) as ws:
        assert (await ask(ws))[-1]["content"] == "DONE"

