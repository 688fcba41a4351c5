"""`POST /api/auth/wx/login` (PROTOCOL.md E.5) on the real app, in front of a fake WeChat on loopback."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain.wxtoken import InvalidToken
from chatgpt.keys import wechat_login_key
from tests.conftest import MakeClient, url
from tests.fakes.wechat import FakeWeChat
from tests.helpers.redisd import RedisServer, redis_server  # noqa: F401 (a fixture)

OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
LOGIN = "/api/auth/wx/login"


@pytest.fixture
async def app_client(make_client: MakeClient, wechat: FakeWeChat) -> TestClient:  # type: ignore[type-arg]
    """The app with WeChat login on, pointed at the fake."""
    return await make_client(wechat={"appid": wechat.appid, "secret": wechat.secret, "api_base": wechat.base_url},
                             limits={"http_per_second": 1000})


async def login(client: TestClient, body: Any, path: str = LOGIN) -> dict[str, Any]:  # type: ignore[type-arg]
    """POST the body (JSON unless bytes) and return the envelope, checking it came as HTTP 200 JSON."""
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with client.session.post(url(client, path), **kwargs) as response:
        assert response.status == 200
        envelope: dict[str, Any] = await response.json()
        return envelope


@pytest.mark.parametrize("path", [LOGIN, "/" + LOGIN, "/api1/auth/wx/login"])
async def test_a_login_answers_a_token_for_the_openid_and_its_lifetime(
        app_client: TestClient, wechat: FakeWeChat, path: str) -> None:  # type: ignore[type-arg]
    answer = await login(app_client, {"code": wechat.login_code(OPENID)}, path)
    assert (answer["status"], answer["msg"], answer["expiresIn"]) == ("000000", "SUCCESS", 30 * 86400)
    assert set(answer) == {"status", "msg", "timestamp", "token", "expiresIn"}
    assert app_client.app[wechat_login_key].openid_of(answer["token"]) == OPENID
    assert wechat.session_keys[-1] not in str(answer)


async def test_the_lifetime_follows_session_days(make_client: MakeClient, wechat: FakeWeChat) -> None:
    client = await make_client(wechat={"appid": wechat.appid, "secret": wechat.secret,
                                       "api_base": wechat.base_url, "session_days": 7})
    assert (await login(client, {"code": wechat.login_code(OPENID)}))["expiresIn"] == 7 * 86400


async def test_a_code_works_once(app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    code = wechat.login_code(OPENID)
    assert (await login(app_client, {"code": code}))["status"] == "000000"
    again = await login(app_client, {"code": code})
    assert (again["status"], again["msg"]) == ("400001", "登录凭证已被使用, 请重新登录")
    assert "token" not in again


@pytest.mark.parametrize(("errcode", "message"), [
    (40029, "登录凭证无效, 请重新登录"),
    (45011, "登录太频繁, 请稍后再试"),
    (40226, "该微信账号存在安全风险, 暂时无法登录"),
    (-1, "微信系统繁忙, 请稍后再试"),
])
async def test_wechat_refusals_are_400001_with_a_chinese_message(
        app_client: TestClient, wechat: FakeWeChat, errcode: int, message: str) -> None:  # type: ignore[type-arg]
    answer = await login(app_client, {"code": wechat.failing_code(errcode)})
    assert (answer["status"], answer["msg"]) == ("400001", message)


async def test_a_wrong_app_secret_is_a_setup_error_for_the_user(
        make_client: MakeClient, wechat: FakeWeChat) -> None:
    client = await make_client(wechat={"appid": wechat.appid, "secret": "wrong-secret-" + "z" * 12,
                                       "api_base": wechat.base_url})
    answer = await login(client, {"code": wechat.login_code(OPENID)})
    assert (answer["status"], answer["msg"]) == ("400001", "微信登录暂不可用, 请联系管理员")


@pytest.mark.parametrize("broken", ["html", "garbage"])
async def test_wechat_unreachable_is_500001(
        app_client: TestClient, wechat: FakeWeChat, broken: str) -> None:  # type: ignore[type-arg]
    wechat.broken = broken
    answer = await login(app_client, {"code": wechat.login_code(OPENID)})
    assert (answer["status"], answer["msg"]) == ("500001", "微信服务暂时无法访问, 请稍后再试")


@pytest.mark.parametrize(("body", "status"), [
    ({}, "300001"), ({"code": ""}, "300001"), ({"code": 123}, "300001"), ({"code": "a&secret=x"}, "300001"),
    ({"code": "x" * 129}, "300001"), (b"", "200001"), (b"{not json", "200002"), ([1, 2], "200002"),
])
async def test_a_missing_or_impossible_code_is_refused_without_asking_wechat(
        app_client: TestClient, wechat: FakeWeChat, body: Any, status: str) -> None:  # type: ignore[type-arg]
    answer = await login(app_client, body)
    assert answer["status"] == status
    if status == "300001":
        assert answer["msg"] == "缺少登录凭证code, 请调用wx.login获取"
    assert wechat.calls["/sns/jscode2session"] == 0


async def test_login_attempts_are_rate_limited_per_address(
        app_client: TestClient, wechat: FakeWeChat) -> None:  # type: ignore[type-arg]
    for _ in range(30):
        assert (await login(app_client, {"code": "0" * 32}))["status"] == "400001"  # unknown codes
    answer = await login(app_client, {"code": wechat.login_code(OPENID)})
    assert (answer["status"], answer["msg"]) == ("700001", "访问频繁, 请稍后再试!")
    assert wechat.calls["/sns/jscode2session"] == 30


async def test_login_is_off_without_an_appid(client: TestClient) -> None:  # type: ignore[type-arg]
    answer = await login(client, {"code": "0" * 32})
    assert (answer["status"], answer["msg"]) == ("400001", "服务器未开启微信登录")


async def test_a_token_from_another_server_or_edited_is_refused(
        app_client: TestClient, wechat: FakeWeChat, make_client: MakeClient) -> None:  # type: ignore[type-arg]
    token = (await login(app_client, {"code": wechat.login_code(OPENID)}))["token"]
    other = await make_client(wechat={"appid": wechat.appid, "secret": wechat.secret, "api_base": wechat.base_url})
    with pytest.raises(InvalidToken):  # without wechat.token_secret, each server makes its own random secret
        other.app[wechat_login_key].openid_of(token)
    with pytest.raises(InvalidToken):
        app_client.app[wechat_login_key].openid_of(token[:-2] + ("AA" if not token.endswith("AA") else "BB"))


async def test_a_configured_token_secret_keeps_tokens_valid_across_restarts(
        make_client: MakeClient, wechat: FakeWeChat) -> None:
    settings = {"appid": wechat.appid, "secret": wechat.secret, "api_base": wechat.base_url,
                "token_secret": "a-shared-token-secret-0123456789"}
    first, second = await make_client(wechat=settings), await make_client(wechat=settings)
    token = (await login(first, {"code": wechat.login_code(OPENID)}))["token"]
    assert second.app[wechat_login_key].openid_of(token) == OPENID


async def test_without_a_token_secret_tokens_stay_valid_across_a_restart_on_the_same_state_file(
        make_client: MakeClient, wechat: FakeWeChat, tmp_path: Path) -> None:
    settings = {"appid": wechat.appid, "secret": wechat.secret, "api_base": wechat.base_url}
    first = await make_client(wechat=settings)
    token = (await login(first, {"code": wechat.login_code(OPENID)}))["token"]
    await first.close()  # the state file (with the made secret) is written at shutdown
    second = await make_client(wechat=settings, state={"file": str(tmp_path / "state.json")})
    assert second.app[wechat_login_key].openid_of(token) == OPENID


async def test_without_a_token_secret_instances_sharing_redis_verify_each_others_tokens(
        make_client: MakeClient, wechat: FakeWeChat, redis_server: RedisServer) -> None:
    settings = {"appid": wechat.appid, "secret": wechat.secret, "api_base": wechat.base_url}
    first, second = [await make_client(wechat=settings, state={"redis_url": redis_server.url}) for _ in range(2)]
    token = (await login(first, {"code": wechat.login_code(OPENID)}))["token"]
    assert second.app[wechat_login_key].openid_of(token) == OPENID
