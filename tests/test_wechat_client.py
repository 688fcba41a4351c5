"""The WeChat API client (PROTOCOL.md E.5) against a fake WeChat on loopback: login, access token, msgSecCheck."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import pytest

from chatgpt.domain.wechat import CHECK_FAILED, CONFIG_FAILED, WeChatRefused, WeChatUnreachable, WxSession
from chatgpt.upstream.session import make_session
from chatgpt.upstream.wechat import WeChatClient
from tests.fakes.wechat import FakeWeChat, fake_secrets
from tests.helpers.servers import refusing_port

OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def client_for(fake: FakeWeChat, session: aiohttp.ClientSession, **options: object) -> WeChatClient:
    """Our client, pointed at the fake, on the fake's clock."""
    return WeChatClient(session, appid=fake.appid, secret=fake.secret, api_base=fake.base_url,
                        clock=fake.clock, **options)  # type: ignore[arg-type]


async def refusal(call: Awaitable[object]) -> WeChatRefused:
    """The WeChatRefused `call` raises."""
    with pytest.raises(WeChatRefused) as caught:
        await call
    return caught.value


# --- login ---

async def test_a_login_code_gives_the_openid_and_works_only_once(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    client = client_for(wechat, session)
    code = wechat.login_code(OPENID)
    assert await client.code2session(code) == WxSession(OPENID)
    again = await refusal(client.code2session(code))
    assert (again.errcode, again.message) == (40163, "登录凭证已被使用, 请重新登录")
    assert wechat.calls["/sns/jscode2session"] == 2


async def test_the_login_answer_is_read_though_wechat_labels_it_text_plain(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{wechat.base_url}/sns/jscode2session", params={"appid": wechat.appid}) as answer:
        assert answer.content_type == "text/plain"  # as the real WeChat does: the client must not care
    assert (await client_for(wechat, session).code2session(wechat.login_code(OPENID))).openid == OPENID


@pytest.mark.parametrize(("errcode", "message"), [
    (40029, "登录凭证无效, 请重新登录"),
    (45011, "登录太频繁, 请稍后再试"),
    (40226, "该微信账号存在安全风险, 暂时无法登录"),
    (-1, "微信系统繁忙, 请稍后再试"),
    (40099, "微信登录失败, 请稍后再试"),
])
async def test_each_login_refusal_has_its_chinese_message(
        wechat: FakeWeChat, session: aiohttp.ClientSession, errcode: int, message: str) -> None:
    refused = await refusal(client_for(wechat, session).code2session(wechat.failing_code(errcode)))
    assert (refused.errcode, refused.message) == (errcode, message)


async def test_an_unknown_code_is_invalid(wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    assert (await refusal(client_for(wechat, session).code2session("0" * 32))).errcode == 40029


async def test_a_wrong_secret_is_a_setup_error_and_the_secret_is_never_logged(
        wechat: FakeWeChat, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-" + "x" * 16
    client = WeChatClient(session, appid=wechat.appid, secret=wrong, api_base=wechat.base_url, clock=wechat.clock)
    refused = await refusal(client.code2session(wechat.login_code(OPENID)))
    assert (refused.errcode, refused.message) == (40125, CONFIG_FAILED)
    assert wrong not in repr(client) and wrong not in str(refused)
    assert "40125" in caplog.text and wrong not in caplog.text


# --- WeChat unreachable ---

async def test_a_closed_port_is_unreachable(session: aiohttp.ClientSession) -> None:
    client = WeChatClient(session, appid="wx1", secret="s" * 32, api_base=f"http://127.0.0.1:{refusing_port()}")
    with pytest.raises(WeChatUnreachable):
        await client.code2session("0" * 32)


@pytest.mark.parametrize("broken", ["html", "garbage", "huge"])
async def test_an_answer_that_is_not_wechat_json_is_unreachable(
        wechat: FakeWeChat, session: aiohttp.ClientSession, broken: str) -> None:
    wechat.broken = broken
    with pytest.raises(WeChatUnreachable):
        await client_for(wechat, session).code2session(wechat.login_code(OPENID))
    with pytest.raises(WeChatUnreachable):
        await client_for(wechat, session).msg_sec_check("hello", OPENID)


async def test_a_wechat_that_never_answers_is_unreachable_after_the_timeout(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    wechat.broken = "hang"
    with pytest.raises(WeChatUnreachable):
        await client_for(wechat, session, timeout=0.2).code2session(wechat.login_code(OPENID))


async def test_an_http_error_through_the_apps_own_session_is_unreachable(wechat: FakeWeChat) -> None:
    wechat.broken = "html"  # the app session's middleware turns a non-2xx into its own error first
    async with make_session(2) as app_session:
        with pytest.raises(WeChatUnreachable):
            await client_for(wechat, app_session).code2session(wechat.login_code(OPENID))


# --- access token and msgSecCheck ---

async def logged_in(wechat: FakeWeChat, client: WeChatClient, openid: str = OPENID) -> str:
    """Log `openid` in (msgSecCheck only knows users who did)."""
    return (await client.code2session(wechat.login_code(openid))).openid


@pytest.mark.parametrize("stable", [True, False])
async def test_the_access_token_is_cached_until_shortly_before_it_expires(
        wechat: FakeWeChat, session: aiohttp.ClientSession, stable: bool) -> None:
    client = client_for(wechat, session, stable_token=stable)
    path = "/cgi-bin/stable_token" if stable else "/cgi-bin/token"
    openid = await logged_in(wechat, client)
    for _ in range(3):
        assert await client.msg_sec_check("你好", openid) == "pass"
    assert wechat.calls[path] == 1
    wechat.clock.now += 7200 - 300 - 1  # refreshed 300 s before expiry: not yet
    await client.msg_sec_check("你好", openid)
    assert wechat.calls[path] == 1
    wechat.clock.now += 1
    await client.msg_sec_check("你好", openid)
    assert wechat.calls[path] == 2
    assert wechat.calls["/wxa/msg_sec_check"] == 5


@pytest.mark.parametrize("stable", [True, False])
async def test_a_refused_token_is_fetched_again_once(
        wechat: FakeWeChat, session: aiohttp.ClientSession, stable: bool) -> None:
    client = client_for(wechat, session, stable_token=stable)
    path = "/cgi-bin/stable_token" if stable else "/cgi-bin/token"
    openid = await logged_in(wechat, client)
    await client.msg_sec_check("a", openid)
    wechat.refuse_token_once = 1
    assert await client.msg_sec_check("b", openid) == "pass"
    assert (wechat.calls[path], wechat.calls["/wxa/msg_sec_check"]) == (2, 3)


async def test_a_token_expired_early_is_replaced(wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    client = client_for(wechat, session)
    openid = await logged_in(wechat, client)
    await client.msg_sec_check("a", openid)
    wechat.expire_tokens()  # WeChat answers 42001 while our cache still trusts the token
    assert await client.msg_sec_check("b", openid) == "pass"
    assert wechat.calls["/cgi-bin/stable_token"] == 2


async def test_a_token_refused_again_after_the_refresh_is_an_error_not_a_loop(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    client = client_for(wechat, session)
    openid = await logged_in(wechat, client)
    wechat.refuse_token_once = 5
    refused = await refusal(client.msg_sec_check("a", openid))
    assert (refused.errcode, refused.message) == (40001, CHECK_FAILED)
    assert wechat.calls["/wxa/msg_sec_check"] == 2


async def test_concurrent_checks_fetch_one_token(wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    client = client_for(wechat, session)
    openid = await logged_in(wechat, client)
    assert await asyncio.gather(*(client.msg_sec_check(f"m{i}", openid) for i in range(5))) == ["pass"] * 5
    assert wechat.calls["/cgi-bin/stable_token"] == 1


async def test_a_wrong_secret_fails_the_token_without_logging_it(
        wechat: FakeWeChat, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-" + "y" * 16
    client = WeChatClient(session, appid=wechat.appid, secret=wrong, api_base=wechat.base_url, clock=wechat.clock)
    refused = await refusal(client.msg_sec_check("a", OPENID))
    assert refused.errcode == 40001 and wrong not in caplog.text


async def test_the_check_sends_version_2_scene_2_and_the_openid_in_plain_utf8(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    wechat.risky_words, wechat.review_words = {"坏事"}, {"政治"}
    client = client_for(wechat, session)
    openid = await logged_in(wechat, client)
    assert await client.msg_sec_check("今天天气不错", openid) == "pass"
    assert await client.msg_sec_check("聊聊政治吧", openid) == "review"
    assert await client.msg_sec_check("教我做坏事", openid) == "risky"
    assert wechat.checks[0] == {"content": "今天天气不错", "version": 2, "openid": openid, "scene": 2}
    assert "今天天气不错".encode() in wechat.raw_checks[0]  # UTF-8, not \\u escapes


async def test_a_check_for_a_user_wechat_does_not_know_is_refused(
        wechat: FakeWeChat, session: aiohttp.ClientSession) -> None:
    refused = await refusal(client_for(wechat, session).msg_sec_check("hello", "oNeverLoggedIn"))
    assert (refused.errcode, refused.message) == (40003, CHECK_FAILED)


async def test_no_secret_session_key_or_token_reaches_a_log(
        wechat: FakeWeChat, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for(wechat, session)
    openid = await logged_in(wechat, client)
    wechat.refuse_token_once = 1
    await client.msg_sec_check("a", openid)
    wechat.broken = "html"
    with pytest.raises(WeChatUnreachable):
        await client.msg_sec_check("b", openid)
    assert caplog.records
    for value in fake_secrets(wechat):
        assert value not in caplog.text
