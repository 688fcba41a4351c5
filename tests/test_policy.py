"""One policy for every door (PROTOCOL.md E.1), through the real app: the model rule, answer ids, the
refund rule for chat and pictures, empty answers, the offline provider's price, a pool that is all
cooling, and `查询次数` while isDebug is on."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.faces.markdown import to_html
from tests.conftest import USER_KEY, MakeClient, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.test_abuse import FakeBaixing, ask, baixing, baixing_client, remaining  # noqa: F401 (a fixture)
from tests.test_images import FakeImages, UrlAnswer, draw, files_in, start, upstream  # noqa: F401 (a fixture)
from tests.test_v1 import chat_body, openai_error, sse_events
from tests.helpers.frames import question

KEY_A = "sk-key-aaaa1111"
KEY_B = "sk-key-bbbb2222"
CHATCMPL = re.compile(r"chatcmpl-[0-9a-f]{20}")


def refusal(text: str, frames: list[dict[str, Any]], cid: Any = "c-1") -> list[dict[str, Any]]:
    """The one error end frame a refused or failed question gets."""
    return [{"conversationId": cid, "role": "assistant", "content": text, "html": to_html(text),
             "createTime": frames[0]["createTime"], "isDone": True, "isSuccess": False}]


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Poll until `condition()` holds (the fake upstream's view of a request)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- the model rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("door", ["v1", "chat"])
async def test_a_model_not_offered_is_404_model_not_found_on_the_http_doors(client: TestClient, fake: FakeOpenAI,
                                                                           door: str) -> None:
    if door == "v1":
        response = await client.post("/v1/chat/completions", json=chat_body(model="gpt-4-very-expensive"))
    else:
        response = await client.post("/chat", json={"content": "Hi", "model": "gpt-4-very-expensive"})
    error = await openai_error(response, 404)
    assert (error["code"], error["message"]) == (
        "model_not_found", "The model `gpt-4-very-expensive` is not available on this server.")
    assert fake.chat_requests() == []


async def test_any_model_on_the_callers_own_key_is_asked_for_on_chat(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/chat", json={"content": "Hi", "model": "my-fine-tune"},
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    assert response.status == 200
    await response.read()
    assert fake.chat_requests()[0].body["model"] == "my-fine-tune"


# --- answer ids on /v1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream_id", ["chatcmpl-upstream-7", None], ids=["kept", "minted"])
async def test_v1_keeps_the_upstreams_id_or_mints_one(client: TestClient, fake: FakeOpenAI,
                                                      upstream_id: str | None) -> None:
    fake.default = Stream(answer_id=upstream_id)
    ids = []
    for _ in range(2):
        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status == 200
        ids.append((await response.json())["id"])
    if upstream_id is None:
        assert all(CHATCMPL.fullmatch(i) for i in ids) and ids[0] != ids[1]
    else:
        assert ids == [upstream_id] * 2


# --- empty answers ------------------------------------------------------------------------------------

EMPTY = Stream(pieces=[])  # the role chunk, a finish chunk and [DONE]: nothing in it
EMPTY_V1 = "The upstream sent an empty answer."


async def test_an_empty_answer_is_an_error_frame_and_is_refunded(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 2})
    fake.script.append(EMPTY)
    async with ws_connect(client) as ws:
        frames = await ask(ws)
        assert frames == refusal(texts.UPSTREAM_FAILED, frames)
        assert await remaining(ws) == "2"
    assert len(fake.chat_requests()) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_an_empty_answer_is_a_502_on_v1(client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    fake.script.append(EMPTY)
    error = await openai_error(await client.post("/v1/chat/completions", json=chat_body(stream=stream)), 502)
    assert (error["message"], error["type"]) == (EMPTY_V1, "api_error")


async def test_an_empty_answer_is_a_502_on_chat_and_is_not_remembered(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(EMPTY)
    error = await openai_error(await client.post("/chat", json={"content": "Hi", "conversationId": "c-e"}), 502)
    assert error["message"] == EMPTY_V1
    await (await client.post("/chat", json={"content": "again", "conversationId": "c-e"})).read()
    assert fake.chat_requests()[1].body["messages"] == [{"role": "user", "content": "again"}]


async def test_an_answer_with_text_after_an_empty_opening_chunk_is_not_empty(client: TestClient,
                                                                            fake: FakeOpenAI) -> None:
    fake.script.append(Stream(pieces=["", "", "late"], delay=0.01))
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status == 200
    events = sse_events(await response.read())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # held back, not dropped
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "late"
    assert events[-1] == "[DONE]"


# --- the refund rule -----------------------------------------------------------------------------------

async def test_a_client_that_leaves_after_the_question_went_upstream_is_charged(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 3})
    fake.script.append(Stream(pieces=["late"], delay=2.0))  # the upstream works on it before any text
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        await until(lambda: len(fake.chat_requests()) == 1)
    await asyncio.wait_for(fake.disconnected.wait(), 2)  # the upstream request was cancelled
    async with ws_connect(client) as ws:
        assert await remaining(ws) == "2"


@pytest.mark.parametrize("while_", ["drawing", "downloading"])
async def test_a_client_that_leaves_after_its_picture_was_asked_for_is_charged(
        make_client: MakeClient, upstream: FakeImages, folder_path: Path, while_: str) -> None:  # noqa: F811
    slow = UrlAnswer(drawing=2.0) if while_ == "drawing" else UrlAnswer(pieces=4, delay=0.3)
    upstream.script.append(slow)
    client = await start(make_client, upstream, quota={"daily_questions": 3})
    async with ws_connect(client) as ws:
        await ws.send_json(draw())
        if while_ == "drawing":
            await until(lambda: len(upstream.requests) == 1)  # the upstream is drawing (and will bill it)
        else:
            await until(lambda: upstream.downloads == 1)  # the upstream drew the picture
    await asyncio.sleep(0.1)
    async with ws_connect(client) as ws:
        assert await remaining(ws) == "2"
    assert [n for n in files_in(folder_path)] == []


async def test_a_picture_the_upstream_refused_is_given_back(make_client: MakeClient, fake: FakeOpenAI) -> None:
    # The default fake has no image route: the upstream answers 404 before doing any work.
    client = await make_client(quota={"daily_questions": 2})
    async with ws_connect(client) as ws:
        frames = await ask(ws, **{"isGenImg": True, "content": "a cat", "messages": []})
        assert frames[-1]["isSuccess"] is False
        assert await remaining(ws) == "2"


# --- the offline provider --------------------------------------------------------------------------------

async def test_offline_answers_cost_no_quota(make_client: MakeClient) -> None:
    client = await make_client(upstream={"api_keys": []}, quota={"daily_questions": 1})
    async with ws_connect(client) as ws:
        for _ in range(2):  # the second would be refused if the first had been charged
            frames = await ask(ws)
            assert frames[-2]["content"] == texts.OFFLINE_ANSWER and frames[-1]["content"] == "DONE"
        picture = await ask(ws, **{"isGenImg": True, "content": "a cat", "messages": []})
        assert picture[-1]["content"] == "DONE"
        assert await remaining(ws) == "1"
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status == 200


# --- a pool whose keys are all cooling -----------------------------------------------------------------

async def test_every_pool_key_cooling_is_busy_with_retry_after_and_never_no_key(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": [KEY_A, KEY_B]}, quota={"daily_questions": 5})
    fake.script.extend([Fail(429, "Rate limit reached.", headers={"Retry-After": "30"}),
                        Fail(429, "Rate limit reached.", headers={"Retry-After": "40"})])
    async with ws_connect(client) as ws:
        first = await ask(ws)
        assert first == refusal(texts.SERVER_BUSY, first)  # both keys tried, both cooling now
        again = await ask(ws)  # nothing is sent upstream while they cool
        assert again == refusal(texts.SERVER_BUSY, again)
        assert await remaining(ws) == "5"  # never charged: nothing was answered
    assert len(fake.chat_requests()) == 2
    for body in ({"stream": False}, {"stream": True}):
        response = await client.post("/v1/chat/completions", json=chat_body(**body))
        error = await openai_error(response, 503)
        assert error["message"] == "Every upstream key of this server is busy; try again later."
        assert 28 <= int(response.headers["Retry-After"]) <= 30  # until the first key is usable
    assert len(fake.chat_requests()) == 2
    for frame in first + again:
        assert frame["content"] != texts.NO_SERVER_KEY


# --- 查询次数 while isDebug is on ---------------------------------------------------------------------

async def test_the_quota_query_reports_the_baixing_limit_while_is_debug_is_on(
        make_client: MakeClient, baixing: FakeBaixing) -> None:  # noqa: F811
    client = await baixing_client(make_client, baixing, quota={"daily_questions": 20, "baixing_daily_questions": 3})
    async with ws_connect(client) as ws:
        assert await remaining(ws) == "3"
        assert (await ask(ws))[-1]["content"] == "DONE"
        assert await remaining(ws) == "2"
    assert len(baixing.received) == 1


@pytest.fixture
def folder_path(tmp_path: Path) -> Path:
    """The images folder the test settings point at."""
    return tmp_path / "images"
