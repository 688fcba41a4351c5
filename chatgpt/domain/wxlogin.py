"""The WeChat login rule: a per-address limit, a code that looks like one, WeChat's openid, a signed token."""
from __future__ import annotations

import logging

from chatgpt.domain.errors import LoginExpired
from chatgpt.domain.limits import LimiterTable
from chatgpt.domain.wechat import LOGIN_OFF, WeChatApi, WeChatRefused, valid_code
from chatgpt.domain.wxtoken import InvalidToken, IssuedToken, TokenSigner

log = logging.getLogger(__name__)

LOGINS_PER_MINUTE = 30.0  # per address; generous because many users share one carrier NAT address


class LoginRateLimited(Exception):
    """Too many login attempts from one address; `retry_after` in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many login attempts")
        self.retry_after = retry_after


class BadLoginCode(Exception):
    """The body's `code` is missing or cannot be a wx.login code (WeChat is not asked)."""


class WeChatLogin:
    """Logs mini-program users in and tells who a token belongs to. `api` is None when login is off."""

    def __init__(self, api: WeChatApi | None, signer: TokenSigner, lifetime: int,
                 limits: LimiterTable | None = None) -> None:
        self._api = api
        self._signer = signer
        self._lifetime = lifetime
        self._limits = limits or LimiterTable(LOGINS_PER_MINUTE, 60.0)

    @property
    def enabled(self) -> bool:
        """Whether WeChat login is configured (wechat.appid and secret)."""
        return self._api is not None

    async def login(self, code: object, address: str) -> IssuedToken:
        """A token for the user behind a one-time `code`; LoginRateLimited, BadLoginCode, WeChat errors."""
        if not await self._limits.allow(address):  # counted before anything else: garbage counts too
            raise LoginRateLimited(self._limits.retry_after(address))
        if self._api is None:
            raise WeChatRefused(0, LOGIN_OFF)
        if not valid_code(code):
            raise BadLoginCode()
        session = await self._api.code2session(code)
        log.info("WeChat login: user …%s", session.openid[-4:])
        return self._signer.issue(session.openid, self._lifetime)

    def openid_of(self, token: object) -> str:
        """The openid a token was issued for; InvalidToken if it is malformed, forged or expired."""
        return self._signer.verify(token)

    def user_of(self, token: object) -> str:
        """The openid behind a question's login token; LoginExpired (the user must log in again) if the
        token is malformed, forged or expired."""
        try:
            return self._signer.verify(token)
        except InvalidToken as exc:
            log.info("a login token was refused (%s)", exc.reason)
            raise LoginExpired(exc.reason) from None


__all__ = ["BadLoginCode", "InvalidToken", "LoginRateLimited", "WeChatLogin"]
