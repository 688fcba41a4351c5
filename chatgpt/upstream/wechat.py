"""WeChat's server APIs over the app's ClientSession: login (code2session), the access token, msgSecCheck v2."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp

from chatgpt.domain.wechat import (
    CHECK_FAILED,
    Suggest,
    WeChatRefused,
    WeChatUnreachable,
    WxSession,
    login_refusal,
)

log = logging.getLogger(__name__)

ANSWER_LIMIT = 64 * 1024  # WeChat's answers are a few hundred bytes; a longer one is not WeChat
TOKEN_REFUSED = frozenset({40001, 42001})  # access token invalid / expired: fetch a new one, once
SUGGESTS: frozenset[str] = frozenset({"pass", "review", "risky"})


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The body, or ANSWER_LIMIT + 1 bytes of it when it is longer (then it is refused)."""
    raw = b""
    while len(raw) <= ANSWER_LIMIT:
        more = await response.content.read(ANSWER_LIMIT + 1 - len(raw))
        if not more:
            break
        raw += more
    return raw


class WeChatClient:
    """Calls WeChat for one mini-program. Never logs or raises with the secret, a session_key or a token."""

    def __init__(self, session: aiohttp.ClientSession, *, appid: str, secret: str,
                 api_base: str = "https://api.weixin.qq.com", timeout: float = 10.0,
                 stable_token: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self._session = session
        self._appid = appid
        self._secret = secret
        self._base = api_base.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # stable_token: every instance of the app gets the same token, and fetching one does not
        # invalidate the token another instance holds (cgi-bin/token does, after 5 minutes).
        self._stable = stable_token
        self._clock = clock
        self._token = ""
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()  # concurrent checks with no token fetch it once

    def __repr__(self) -> str:
        return f"WeChatClient(appid={self._appid!r}, api_base={self._base!r})"

    async def _call(self, what: str, method: str, path: str, *, params: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; WeChat's JSON object back (whatever its content type), else WeChatUnreachable."""
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = None if body is None else {"Content-Type": "application/json; charset=utf-8"}
        try:
            async with self._session.request(method, self._base + path, params=params, data=data,
                                             headers=headers, timeout=self._timeout) as response:
                status = response.status
                raw = await _read_capped(response) if status == 200 else b""
        except asyncio.CancelledError:
            raise
        # Deliberately broad: aiohttp and socket errors, timeouts, and whatever the app session's
        # middleware raises for a non-2xx status all mean the same here. The exception text can hold
        # the URL with the secret or the token in it: only its class name goes on.
        except Exception as exc:
            log.warning("WeChat %s: unreachable (%s)", what, type(exc).__name__)
            raise WeChatUnreachable(f"{what}: {type(exc).__name__}") from None
        if status != 200:
            log.warning("WeChat %s: HTTP %s", what, status)
            raise WeChatUnreachable(f"{what}: HTTP {status}")
        try:
            # WeChat often labels its JSON text/plain: the body is parsed whatever the content type
            answer = json.loads(raw) if len(raw) <= ANSWER_LIMIT else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            log.warning("WeChat %s: the answer is not a JSON object (%s bytes)", what, len(raw))
            raise WeChatUnreachable(f"{what}: not WeChat's JSON")
        return answer

    @staticmethod
    def _errcode(answer: dict[str, Any]) -> int:
        """The answer's errcode: 0 when absent (code2session leaves it out on success)."""
        errcode = answer.get("errcode", 0)
        if isinstance(errcode, bool) or not isinstance(errcode, int):
            raise WeChatUnreachable("errcode is not a number")
        return errcode

    @staticmethod
    def _errmsg(answer: dict[str, Any]) -> str:
        errmsg = answer.get("errmsg")
        return errmsg[:200] if isinstance(errmsg, str) else ""

    async def code2session(self, code: str) -> WxSession:
        """The openid for a one-time wx.login code; WeChatRefused (login texts) or WeChatUnreachable."""
        answer = await self._call("login", "GET", "/sns/jscode2session", params={
            "appid": self._appid, "secret": self._secret, "js_code": code,
            "grant_type": "authorization_code"})
        errcode = self._errcode(answer)
        if errcode != 0:
            log.warning("WeChat login refused: errcode %s (%s)", errcode, self._errmsg(answer))
            raise login_refusal(errcode, self._errmsg(answer))
        openid, unionid = answer.get("openid"), answer.get("unionid")
        if not isinstance(openid, str) or not openid:
            log.warning("WeChat login: no openid in the answer")
            raise WeChatUnreachable("login: no openid")
        # answer["session_key"] is dropped here on purpose: it never leaves this function.
        return WxSession(openid, unionid if isinstance(unionid, str) and unionid else None)

    async def access_token(self, refused: str = "") -> str:
        """A valid access token, cached until shortly before it expires; `refused` is one WeChat rejected."""
        if self._token and self._token != refused and self._clock() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token and self._token != refused and self._clock() < self._refresh_at:
                return self._token  # fetched by another caller while this one waited
            credentials = {"grant_type": "client_credential", "appid": self._appid, "secret": self._secret}
            if self._stable:
                answer = await self._call("access token", "POST", "/cgi-bin/stable_token", body=credentials)
            else:
                answer = await self._call("access token", "GET", "/cgi-bin/token", params=credentials)
            errcode = self._errcode(answer)
            if errcode != 0:
                # 40001 here means a wrong AppSecret, 40013 a wrong appid, 40164 an address not allowed
                log.error("WeChat access token refused: errcode %s (%s)", errcode, self._errmsg(answer))
                raise WeChatRefused(errcode, CHECK_FAILED, self._errmsg(answer))
            token, expires_in = answer.get("access_token"), answer.get("expires_in")
            if not isinstance(token, str) or not token or isinstance(expires_in, bool) \
                    or not isinstance(expires_in, int) or expires_in <= 0:
                log.warning("WeChat access token: unexpected answer")
                raise WeChatUnreachable("access token: unexpected answer")
            # WeChat renews a token up to 5 minutes before it expires; refresh a little before that
            self._token = token
            self._refresh_at = self._clock() + expires_in - min(300, expires_in // 10)
            log.info("WeChat access token fetched, valid %s s", expires_in)
            return token

    async def msg_sec_check(self, content: str, openid: str) -> Suggest:
        """WeChat's verdict (pass | review | risky) on `content` (at most 2,500 characters) by `openid`."""
        body = {"content": content, "version": 2, "openid": openid, "scene": 2}
        token = await self.access_token()
        answer = await self._call("content check", "POST", "/wxa/msg_sec_check",
                                  params={"access_token": token}, body=body)
        errcode = self._errcode(answer)
        if errcode in TOKEN_REFUSED:  # revoked or expired early: one new token, one more try
            log.info("WeChat refused the access token (errcode %s): fetching a new one", errcode)
            token = await self.access_token(refused=token)
            answer = await self._call("content check", "POST", "/wxa/msg_sec_check",
                                      params={"access_token": token}, body=body)
            errcode = self._errcode(answer)
        if errcode != 0:
            log.warning("WeChat content check refused: errcode %s (%s)", errcode, self._errmsg(answer))
            raise WeChatRefused(errcode, CHECK_FAILED, self._errmsg(answer))
        result = answer.get("result")
        suggest = result.get("suggest") if isinstance(result, dict) else None
        if suggest not in SUGGESTS:
            log.warning("WeChat content check: unexpected answer")
            raise WeChatUnreachable("content check: unexpected answer")
        return cast(Suggest, suggest)
