"""WeChat's content check (`wechat.msg_sec_check`, PROTOCOL.md E.5) on the real app in front of the fake
WeChat: logged-in users' prompts before anything goes upstream, answers in 2,500-character segments as
they complete, one cached access token, and the fail-open / fail-closed policy."""
from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from tests.conftest import MakeClient
from tests.fakes.openai import FakeOpenAI, Stream
from tests.fakes.wechat import FakeWeChat
from tests.helpers.wx import ask, log_in, remaining, wechat_settings

ALICE = "oAlice_000000000000000000000"


@pytest.fixture
def wechat(wechat: FakeWeChat) -> FakeWeChat:
    """conftest's fake WeChat, with a risky word and a word for review."""
    wechat.risky_words = {"炸药"}
    wechat.review_words = {"选举"}
    return wechat


async def start(make_client: MakeClient, wechat: FakeWeChat, **more: Any) -> TestClient:  # type: ignore[type-arg]
    return await make_client(wechat=wechat_settings(wechat, msg_sec_check=True, **more),
                             limits={"http_per_second": 1000})


@pytest.fixture
async def app_client(make_client: MakeClient, wechat: FakeWeChat) -> TestClient:  # type: ignore[type-arg]
    return await start(make_client, wechat)


def contents(frames: list[dict[str, Any]]) -> list[str]:
    return [f["content"] for f in frames]


async def metric(client: TestClient, name: str) -> float:  # type: ignore[type-arg]
    """One sample of /metrics (0 when it has none yet)."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_risky_prompt_is_refused_before_anything_goes_upstream_and_not_counted(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    frames = await ask(app_client, "教我做炸药", alice)
    assert contents(frames) == [texts.CONTENT_SENSITIVE]
    assert (frames[0]["isDone"], frames[0]["isSuccess"]) == (True, False)
    assert fake.chat_requests() == []
    assert await remaining(app_client, alice) == 20
    assert wechat.checks == [{"content": "教我做炸药", "version": 2, "openid": ALICE, "scene": 2}]
    assert await metric(app_client, 'chatgpt_wechat_content_checks_total{outcome="risky",target="prompt"}') == 1


async def test_a_prompt_to_review_is_answered(app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    assert contents(await ask(app_client, "说说选举", alice))[-1] == "DONE"
    assert await metric(app_client, 'chatgpt_wechat_content_checks_total{outcome="review",target="prompt"}') == 1


async def test_a_risky_answer_replaces_the_bubble_with_the_refusal(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    fake.script.append(Stream(pieces=["好的, ", "炸药的做法是"], delay=0.05))
    frames = await ask(app_client, "你好", alice)
    # The text went out as it came; WeChat's verdict on it (at the end: it is shorter than a segment)
    # takes it back: the last frame replaces the bubble, and no DONE follows.
    assert contents(frames) == ["好的, ", "好的, 炸药的做法是", texts.CONTENT_BLOCKED]
    assert (frames[-1]["isDone"], frames[-1]["isSuccess"]) == (True, False)
    assert [c["content"] for c in wechat.checks] == ["你好", "好的, 炸药的做法是"]
    assert await remaining(app_client, alice) == 19  # it went upstream: charged


async def test_a_long_answer_is_checked_in_segments_and_a_risky_one_ends_it_early(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    first = "炸药" + "很" * 2498 + "长"  # 2,501 characters: one whole segment and the start of the next
    fake.script.append(Stream(pieces=[first] + ["还有"] * 200, delay=0.02))
    frames = await ask(app_client, "你好", alice)
    assert frames[-1]["content"] == texts.CONTENT_BLOCKED
    assert len(frames) < 100, "the answer should have ended soon after WeChat's verdict"
    assert await fake.disconnected.wait()  # the upstream request is closed
    checks = [c["content"] for c in wechat.checks]
    assert checks[0] == "你好" and checks[1] == first[:2500]
    assert all(len(c) <= 2500 for c in checks)


async def test_a_long_clean_answer_is_checked_whole_in_segments_before_it_is_done(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    pieces = ["一二三四五六七八九十" * 60] * 10  # 6,000 characters in 600-character chunks
    fake.script.append(Stream(pieces=pieces))
    frames = await ask(app_client, "你好", alice)
    assert frames[-1]["content"] == "DONE"
    answer = "".join(pieces)
    assert [c["content"] for c in wechat.checks[1:]] == [answer[:2500], answer[2500:5000], answer[5000:]]


async def test_one_access_token_serves_every_check(app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    for _ in range(3):
        assert contents(await ask(app_client, "你好", alice))[-1] == "DONE"
    assert wechat.calls["/wxa/msg_sec_check"] == 6  # a prompt and an answer each
    assert wechat.calls["/cgi-bin/stable_token"] == 1


async def test_users_without_a_login_and_http_callers_are_not_sent_to_wechat(
        app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    assert contents(await ask(app_client, "炸药"))[-1] == "DONE"
    response = await app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "炸药"}]})
    assert response.status == 200
    assert wechat.calls["/wxa/msg_sec_check"] == 0


async def test_wechat_unreachable_with_fail_open_allows_and_is_counted(
        app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    wechat.broken = "html"
    assert contents(await ask(app_client, "炸药", alice))[-1] == "DONE"
    assert await remaining(app_client, alice) == 19
    assert await metric(app_client, 'chatgpt_wechat_content_checks_total{outcome="failed",target="prompt"}') == 1
    assert await metric(app_client, 'chatgpt_wechat_content_checks_total{outcome="failed",target="answer"}') == 1


async def test_wechat_unreachable_with_fail_closed_refuses_and_costs_nothing(
        make_client: MakeClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:
    client = await start(make_client, wechat, fail_open=False)
    alice = await log_in(client, wechat, ALICE)
    wechat.broken = "garbage"
    frames = await ask(client, "你好", alice)
    assert contents(frames) == [texts.CONTENT_UNCHECKED]
    assert fake.chat_requests() == []
    assert await remaining(client, alice) == 20
    assert await metric(client, 'chatgpt_wechat_content_checks_total{outcome="failed",target="prompt"}') == 1


async def test_a_long_prompt_is_checked_in_segments(make_client: MakeClient, wechat: FakeWeChat,
                                                     fake: FakeOpenAI) -> None:
    client = await start(make_client, wechat)
    alice = await log_in(client, wechat, ALICE)
    prompt = "问" * 2600 + "炸药"  # the risky word is in the second segment
    frames = await ask(client, prompt, alice)
    assert contents(frames) == [texts.CONTENT_SENSITIVE]
    assert sorted(len(c["content"]) for c in wechat.checks) == [102, 2500]
    assert fake.chat_requests() == []
