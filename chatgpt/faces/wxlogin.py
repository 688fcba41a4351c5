"""`POST /api/auth/wx/login` (PROTOCOL.md E.5): a wx.login code in, a signed token and its lifetime out."""
from __future__ import annotations

from aiohttp import web

from chatgpt.domain import texts
from chatgpt.domain.errors import ServiceError, bad_request
from chatgpt.domain.wechat import CODE_MISSING, WeChatRefused, WeChatUnreachable
from chatgpt.domain.wxlogin import BadLoginCode, LoginRateLimited
from chatgpt.faces.envelope import envelope_response
from chatgpt.faces.miniprogram import read_json_object
from chatgpt.keys import wechat_login_key
from chatgpt.server.guards import identity_of


async def wx_login(request: web.Request) -> web.Response:
    """Exchange `{"code": ...}` for `token` + `expiresIn`; WeChat's refusals are `400001` in Chinese."""
    body = await read_json_object(request)
    try:
        issued = await request.app[wechat_login_key].login(body.get("code"), identity_of(request))
    except LoginRateLimited as exc:
        raise ServiceError("700001", texts.HTTP_TOO_FAST, http_status=429, error_type="rate_limit_exceeded",
                           retry_after=exc.retry_after) from None
    except BadLoginCode:
        raise bad_request(CODE_MISSING) from None
    except WeChatRefused as exc:
        raise ServiceError("400001", exc.message) from None
    except WeChatUnreachable as exc:
        raise ServiceError("500001", exc.message, http_status=502, error_type="api_error") from None
    return envelope_response(token=issued.token, expiresIn=issued.expires_in)


def add_routes(app: web.Application) -> None:
    """Register the login; `//api/...` and `/api1/...` reach it through server/routing.py."""
    app.router.add_post("/api/auth/wx/login", wx_login)
