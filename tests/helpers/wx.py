"""A mini-program user logged in with WeChat: the login as the mini-program does it, and its frames."""
from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import url, ws_connect
from tests.fakes.wechat import FakeWeChat
from tests.helpers.frames import question, receive_answer

TOKEN_SECRET = "a-shared-token-secret-0123456789"  # wechat.token_secret in these tests: tokens can be forged


def wechat_settings(fake: FakeWeChat, **more: Any) -> dict[str, Any]:
    """The `wechat:` section pointing the app at the fake."""
    return {"appid": fake.appid, "secret": fake.secret, "api_base": fake.base_url, "token_secret": TOKEN_SECRET,
            **more}


async def log_in(client: TestClient, fake: FakeWeChat, openid: str) -> str:  # type: ignore[type-arg]
    """wx.login's code posted to `//api/auth/wx/login`, as the mini-program does; the token it keeps."""
    async with client.session.post(url(client, "//api/auth/wx/login"),
                                   json={"code": fake.login_code(openid)}) as response:
        envelope: dict[str, Any] = await response.json()
    assert envelope["status"] == "000000", envelope
    token: str = envelope["token"]
    return token


async def ask(client: TestClient, prompt: str = "你好", token: str | None = None,  # type: ignore[type-arg]
              **fields: Any) -> list[dict[str, Any]]:
    """One anonymous (isDemo) question on a fresh socket, with the login token when given; its frames."""
    frame = question(prompt, **fields)
    if token is not None:
        frame["token"] = token
    async with ws_connect(client) as ws:
        await ws.send_json(frame)
        return await receive_answer(ws)


async def remaining(client: TestClient, token: str | None = None) -> int:  # type: ignore[type-arg]
    """`查询次数` for the logged-in user (or the address without a token)."""
    frames = await ask(client, "查询次数", token)
    assert len(frames) == 1 and frames[0]["isSuccess"] is False, frames
    return int(frames[0]["content"])
