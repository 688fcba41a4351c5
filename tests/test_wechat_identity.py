"""Logged-in mini-program users (PROTOCOL.md E.5): a websocket question with `isDemo` and a login token
counts against that WeChat user's daily quota, not the address's; bad tokens cost nothing."""
from __future__ import annotations

import time

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.domain.wxtoken import TokenSigner
from tests.conftest import USER_KEY, MakeClient, ws_connect
from tests.fakes.openai import FakeOpenAI
from tests.fakes.wechat import FakeWeChat
from tests.helpers.frames import question, receive_answer
from tests.helpers.wx import TOKEN_SECRET, ask, log_in, remaining, wechat_settings

ALICE = "oAlice_000000000000000000000"
BOB = "oBob_0000000000000000000000000"
REFUSED = {"role": "assistant", "content": texts.LOGIN_EXPIRED, "isDone": True, "isSuccess": False}


@pytest.fixture
async def app_client(make_client: MakeClient, wechat: FakeWeChat) -> TestClient:  # type: ignore[type-arg]
    """Login on, two questions a day, every request from 127.0.0.1."""
    return await make_client(wechat=wechat_settings(wechat), quota={"daily_questions": 2},
                             limits={"http_per_second": 1000})


def answered(frames: list[dict[str, object]]) -> bool:
    return frames[-1]["content"] == "DONE" and frames[-1]["isSuccess"] is True


def refusal(frames: list[dict[str, object]]) -> dict[str, object]:
    """The one frame of a refused question, without its time."""
    assert len(frames) == 1, frames
    return {k: v for k, v in frames[0].items() if k in ("role", "content", "isDone", "isSuccess")}


async def test_two_users_behind_one_address_each_get_their_own_daily_count(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice, bob = await log_in(app_client, wechat, ALICE), await log_in(app_client, wechat, BOB)
    assert await remaining(app_client, alice) == await remaining(app_client, bob) == 2
    assert answered(await ask(app_client, token=alice))
    assert answered(await ask(app_client, token=alice))
    over = await ask(app_client, token=alice)
    assert refusal(over) == {**REFUSED, "content": texts.QUOTA_USED_UP}
    # Bob, on the same address, has his own two; the address itself (no token) has its two as before.
    assert (await remaining(app_client, alice), await remaining(app_client, bob), await remaining(app_client)) \
        == (0, 2, 2)
    assert answered(await ask(app_client, token=bob))
    assert answered(await ask(app_client))
    assert (await remaining(app_client, alice), await remaining(app_client, bob), await remaining(app_client)) \
        == (0, 1, 1)
    assert len(fake.chat_requests()) == 4


async def test_a_forged_token_is_told_to_log_in_again_and_costs_nothing(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    forged = TokenSigner(b"not-the-server-secret-0123456789").issue(ALICE, 3600).token
    edited = alice[:-3] + ("AAA" if not alice.endswith("AAA") else "BBB")
    for token in (forged, edited, "garbage", "x" * 5000):
        assert refusal(await ask(app_client, token=token)) == REFUSED
        assert refusal(await ask(app_client, "查询次数", token=token)) == REFUSED
    assert fake.chat_requests() == []
    assert (await remaining(app_client, alice), await remaining(app_client)) == (2, 2)


async def test_an_expired_token_is_told_to_log_in_again_and_costs_nothing(
        app_client: TestClient, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    # Signed with the server's own secret, 31 days ago, for 30 days: genuine, and expired a day ago.
    month_ago = TokenSigner(TOKEN_SECRET.encode(), clock=lambda: time.time() - 31 * 86400)
    expired = month_ago.issue(ALICE, 30 * 86400).token
    assert refusal(await ask(app_client, token=expired)) == REFUSED
    assert fake.chat_requests() == []
    assert await remaining(app_client) == 2
    # The same user, freshly signed, is welcome and counted as herself.
    fresh = TokenSigner(TOKEN_SECRET.encode()).issue(ALICE, 3600).token
    assert answered(await ask(app_client, token=fresh))
    assert (await remaining(app_client, fresh), await remaining(app_client)) == (1, 2)


async def test_a_token_of_the_wrong_type_is_a_bad_field(app_client: TestClient) -> None:  # type: ignore[type-arg]
    async with ws_connect(app_client) as ws:
        await ws.send_json({**question(), "token": 12345})
        frames = await receive_answer(ws)
    assert refusal(frames)["content"] == texts.FRAME_BAD_FIELD.format(field="token")
    assert await remaining(app_client) == 2


async def test_an_empty_token_is_the_address_as_before(app_client: TestClient) -> None:  # type: ignore[type-arg]
    assert answered(await ask(app_client, token=""))
    assert await remaining(app_client) == 1


async def test_a_user_with_an_own_key_and_a_token_is_not_counted(
        app_client: TestClient, wechat: FakeWeChat, fake: FakeOpenAI) -> None:  # type: ignore[type-arg]
    alice = await log_in(app_client, wechat, ALICE)
    frames = await ask(app_client, token=alice, isDemo=False, authValue=f"Bearer {USER_KEY}")
    assert answered(frames)
    assert fake.chat_requests()[-1].authorization == f"Bearer {USER_KEY}"
    assert await remaining(app_client, alice) == 2


async def test_the_per_address_websocket_limit_stays_on_the_address(
        make_client: MakeClient, wechat: FakeWeChat) -> None:
    client = await make_client(wechat=wechat_settings(wechat), limits={"ws_per_minute": 2, "http_per_second": 1000})
    alice, bob = await log_in(client, wechat, ALICE), await log_in(client, wechat, BOB)
    assert answered(await ask(client, token=alice))
    assert answered(await ask(client, token=bob))
    assert refusal(await ask(client, token=alice))["content"] == texts.WS_TOO_FAST
