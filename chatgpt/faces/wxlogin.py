"""`POST /api/auth/wx/login` (PROTOCOL.md E.5): a wx.login code in, a signed token and its lifetime out."""
from __future__ import annotations

from aiohttp import web

from chatgpt.domain.errors import BadQuestion, RateLimited
from chatgpt.domain.wechat import CODE_MISSING, WeChatRefused, WeChatUnreachable
from chatgpt.domain.wxlogin import BadLoginCode, LoginRateLimited
from chatgpt.faces.envelope import envelope_response
from chatgpt.faces.miniprogram import limited
from chatgpt.keys import wechat_login_key
from chatgpt.server.bodies import read_object
from chatgpt.server.guards import identity_of


async def wx_login(request: web.Request) -> web.Response:
    """Exchange `{"code": ...}` for `token` + `expiresIn`; WeChat's refusals are `400001` in Chinese."""
    body = await read_object(request)
    try:
        issued = await request.app[wechat_login_key].login(body.get("code"), identity_of(request))
    except LoginRateLimited as exc:
        raise RateLimited("http", exc.retry_after) from None
    except BadLoginCode:
        raise BadQuestion(CODE_MISSING, "code") from None
    except WeChatRefused as exc:
        return envelope_response("400001", exc.message)
    except WeChatUnreachable as exc:
        return envelope_response("500001", exc.message)
    return envelope_response(token=issued.token, expiresIn=issued.expires_in)


def add_routes(app: web.Application) -> None:
    """Register the login; `//api/...` and `/api1/...` reach it through server/routing.py."""
    app.router.add_post("/api/auth/wx/login", limited(wx_login))
