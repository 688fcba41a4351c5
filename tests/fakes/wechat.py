"""A fake WeChat server API: a real aiohttp application answering as api.weixin.qq.com does.

Login (`/sns/jscode2session`): codes are one-time (a reused code → 40163), unknown ones → 40029,
scripted ones → any errcode; the answer is JSON labelled `text/plain`, as WeChat labels it.
Access tokens (`/cgi-bin/token`, `/cgi-bin/stable_token`) expire on the fake's clock; a new
`cgi-bin/token` leaves the previous one 5 more minutes. `/wxa/msg_sec_check` (v2) answers `risky` or
`review` for listed words, 40001/42001 for refused tokens, and WeChat's other errcodes for bad input.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

LOGIN_ERRMSG = {
    40029: "invalid code", 40163: "code been used", 40226: "code blocked", -1: "system error",
    45011: "api minute-quota reach limit  mustslower  retry next minute",
    40013: "invalid appid", 40125: "invalid appsecret",
}
LABELS = {"risky": 20006, "review": 20001, "pass": 100}  # 20006 违法犯罪, 20001 时政, 100 正常


class Clock:
    """Fake time shared by the fake and the client under test; tests move `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_code() -> str:
    """A code shaped like wx.login's: 32 letters and digits."""
    return secrets.token_hex(16)


async def start_fake_wechat(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeWeChat:
    """A running fake WeChat at `fake.base_url`, with its access log off: that log is WeChat's (it would
    hold the secret and tokens in its URLs), and only our process's log lines count for the secrets check."""
    fake = FakeWeChat()
    server = await aiohttp_server(fake.app, access_log=None)
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


def fake_secrets(fake: FakeWeChat) -> list[str]:
    """Everything of the fake's that must never reach our logs or answers."""
    return [fake.secret, *fake.session_keys, *fake.tokens]


class FakeWeChat:
    """Scripted WeChat. Give users with `login_code(openid)`, break it with `broken` or the `*_once` flags."""

    def __init__(self, appid: str = "wx0123456789abcdef", clock: Clock | None = None) -> None:
        self.appid = appid
        self.secret = "wechat-secret-" + secrets.token_hex(8)
        self.clock = clock or Clock()
        self.base_url = ""  # set by whoever starts it: http://127.0.0.1:PORT
        self.codes: dict[str, str] = {}  # code → openid
        self.code_errors: dict[str, int] = {}  # code → errcode WeChat answers for it
        self.used: set[str] = set()
        self.session_keys: list[str] = []  # every session_key handed out (must never leave our server)
        self.known_openids: set[str] = set()  # msgSecCheck knows users who logged in
        self.token_lifetime = 7200
        self.tokens: dict[str, float] = {}  # access token → expiry on the fake clock
        self.stable = ""  # the current stable_token
        self.revoked: set[str] = set()  # tokens answered with 40001
        self.refuse_token_once = 0  # the next N checks answer 40001 whatever the token
        self.risky_words: set[str] = set()
        self.review_words: set[str] = set()
        self.checks: list[dict[str, Any]] = []  # msg_sec_check bodies received
        self.raw_checks: list[bytes] = []
        self.calls: Counter[str] = Counter()  # path → requests
        self.broken = ""  # "" | "html" (HTTP 502 page) | "garbage" (200, not JSON) | "hang" | "huge"
        self.app = web.Application(middlewares=[self._gateway])
        self.app.router.add_get("/sns/jscode2session", self.jscode2session)
        self.app.router.add_get("/cgi-bin/token", self.token)
        self.app.router.add_post("/cgi-bin/stable_token", self.stable_token)
        self.app.router.add_route("*", "/wxa/msg_sec_check", self.msg_sec_check)

    def login_code(self, openid: str) -> str:
        """A fresh one-time code that logs `openid` in."""
        code = new_code()
        self.codes[code] = openid
        return code

    def failing_code(self, errcode: int) -> str:
        """A code WeChat answers with `errcode` (40029, 45011, 40226, -1...)."""
        code = new_code()
        self.code_errors[code] = errcode
        return code

    def expire_tokens(self) -> None:
        """Every access token expires now (WeChat then answers 42001)."""
        for token in self.tokens:
            self.tokens[token] = min(self.tokens[token], self.clock())

    def revoke_tokens(self) -> None:
        """Every access token handed out so far is refused as invalid (40001) from now on."""
        self.revoked.update(self.tokens)

    @web.middleware
    async def _gateway(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        """Every API counts its calls and breaks the same way when `broken` is set, before its own checks."""
        self.calls[request.path] += 1
        broken = await self._maybe_broken()
        return broken if broken is not None else await handler(request)

    async def _maybe_broken(self) -> web.Response | None:
        if self.broken == "html":
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if self.broken == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if self.broken == "huge":
            return web.Response(text='{"errcode":0,"pad":"' + "x" * 200_000 + '"}', content_type="text/plain")
        if self.broken == "hang":
            await asyncio.Event().wait()  # until the client gives up and the server shuts down
        return None

    @staticmethod
    def _answer(data: dict[str, Any], content_type: str = "application/json") -> web.Response:
        rid = f"rid: {secrets.token_hex(4)}-{secrets.token_hex(4)}"
        if "errmsg" in data and data.get("errcode"):
            data["errmsg"] = f"{data['errmsg']}, {rid}"
        return web.Response(text=json.dumps(data), content_type=content_type)

    async def jscode2session(self, request: web.Request) -> web.Response:
        q = request.query
        plain = "text/plain"  # how WeChat labels this JSON
        if q.get("appid") != self.appid:
            return self._answer({"errcode": 40013, "errmsg": LOGIN_ERRMSG[40013]}, plain)
        if q.get("secret") != self.secret:
            return self._answer({"errcode": 40125, "errmsg": LOGIN_ERRMSG[40125]}, plain)
        if q.get("grant_type") != "authorization_code":
            return self._answer({"errcode": 40002, "errmsg": "invalid grant_type"}, plain)
        code = q.get("js_code", "")
        if code in self.code_errors:
            errcode = self.code_errors[code]
            return self._answer({"errcode": errcode, "errmsg": LOGIN_ERRMSG.get(errcode, "error")}, plain)
        if code in self.used:
            return self._answer({"errcode": 40163, "errmsg": LOGIN_ERRMSG[40163]}, plain)
        if code not in self.codes:
            return self._answer({"errcode": 40029, "errmsg": LOGIN_ERRMSG[40029]}, plain)
        self.used.add(code)
        openid = self.codes.pop(code)
        self.known_openids.add(openid)
        session_key = secrets.token_urlsafe(18)
        self.session_keys.append(session_key)
        return self._answer({"session_key": session_key, "openid": openid}, plain)  # no errcode on success

    def _issue(self) -> str:
        token = "ACCESS_" + secrets.token_urlsafe(24)
        self.tokens[token] = self.clock() + self.token_lifetime
        return token

    def _credentials_error(self, appid: object, secret: object) -> web.Response | None:
        if appid != self.appid:
            return self._answer({"errcode": 40013, "errmsg": "invalid appid"})
        if secret != self.secret:
            return self._answer({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or "
                                 "not latest"})  # what cgi-bin/token says for a wrong AppSecret
        return None

    async def token(self, request: web.Request) -> web.Response:
        q = request.query
        error = self._credentials_error(q.get("appid"), q.get("secret"))
        if error is not None:
            return error
        now = self.clock()
        for old in self.tokens:  # a new token leaves the previous ones 5 more minutes
            self.tokens[old] = min(self.tokens[old], now + 300)
        return self._answer({"access_token": self._issue(), "expires_in": self.token_lifetime})

    async def stable_token(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return self._answer({"errcode": 47001, "errmsg": "data format error"})
        if not isinstance(body, dict) or body.get("grant_type") != "client_credential":
            return self._answer({"errcode": 40002, "errmsg": "invalid grant_type"})
        error = self._credentials_error(body.get("appid"), body.get("secret"))
        if error is not None:
            return error
        now = self.clock()
        if body.get("force_refresh") is True or self.tokens.get(self.stable, 0) <= now:
            self.stable = self._issue()
        return self._answer({"access_token": self.stable, "expires_in": int(self.tokens[self.stable] - now)})

    async def msg_sec_check(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return self._answer({"errcode": 43302, "errmsg": "require POST method"})
        token = request.query.get("access_token", "")
        if not token:
            return self._answer({"errcode": 41001, "errmsg": "access_token missing"})
        if self.refuse_token_once > 0:
            self.refuse_token_once -= 1
            return self._answer({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid or "
                                 "not latest"})
        if token in self.revoked or token not in self.tokens:
            return self._answer({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
        if self.tokens[token] <= self.clock():
            return self._answer({"errcode": 42001, "errmsg": "access_token expired"})
        raw = await request.read()
        self.raw_checks.append(raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return self._answer({"errcode": 47001, "errmsg": "data format error"})
        if not isinstance(body, dict) or body.get("version") != 2:
            return self._answer({"errcode": 47001, "errmsg": "data format error"})
        self.checks.append(body)
        content = body.get("content")
        if not isinstance(content, str) or not content:
            return self._answer({"errcode": 44002, "errmsg": "empty post data"})
        if body.get("scene") not in (1, 2, 3, 4):
            return self._answer({"errcode": 40129, "errmsg": "invalid scene"})
        if body.get("openid") not in self.known_openids:
            return self._answer({"errcode": 40003, "errmsg": "invalid openid"})
        if len(content) > 2500:  # the documented limit; the real answer to more is not documented
            return self._answer({"errcode": 47001, "errmsg": "data format error, content too long"})
        suggest = "risky" if any(w in content for w in self.risky_words) else (
            "review" if any(w in content for w in self.review_words) else "pass")
        label = LABELS[suggest]
        return self._answer({
            "errcode": 0, "errmsg": "ok",
            "result": {"suggest": suggest, "label": label},
            "detail": [{"strategy": "content_model", "errcode": 0, "suggest": suggest, "label": label, "prob": 90},
                       {"strategy": "keyword", "errcode": 0}],
            "trace_id": f"{secrets.token_hex(4)}-{secrets.token_hex(4)}-{secrets.token_hex(4)}",
        })
