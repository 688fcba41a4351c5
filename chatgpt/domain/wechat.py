"""WeChat as the rules see it: the API the login and the content check call, its failures, and their texts."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol, TypeGuard

from chatgpt.domain import texts

Suggest = Literal["pass", "review", "risky"]

_CODE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # wx.login codes are 32 such characters

# What the user reads when WeChat refuses a login (PROTOCOL.md E.5: `400001` with a Chinese message).
LOGIN_MESSAGES: dict[int, str] = {
    40029: "登录凭证无效, 请重新登录",
    40163: "登录凭证已被使用, 请重新登录",
    45011: "登录太频繁, 请稍后再试",
    40226: "该微信账号存在安全风险, 暂时无法登录",
    -1: "微信系统繁忙, 请稍后再试",
}
LOGIN_FAILED = "微信登录失败, 请稍后再试"
# Errors that mean this server is set up wrong (appid, secret), not that the user did something wrong.
CONFIG_ERRCODES = frozenset({40013, 40125, 41002, 41004, 40164})
CONFIG_FAILED = "微信登录暂不可用, 请联系管理员"
CHECK_FAILED = texts.CONTENT_UNCHECKED
UNREACHABLE = "微信服务暂时无法访问, 请稍后再试"
CODE_MISSING = "缺少登录凭证code, 请调用wx.login获取"
LOGIN_OFF = "服务器未开启微信登录"


class WeChatRefused(Exception):
    """WeChat answered with an `errcode`; `message` is the user's text, `errmsg` WeChat's own (for logs)."""

    def __init__(self, errcode: int, message: str, errmsg: str = "") -> None:
        super().__init__(f"WeChat errcode {errcode}")
        self.errcode = errcode
        self.message = message
        self.errmsg = errmsg


class WeChatUnreachable(Exception):
    """WeChat could not be reached, timed out, or answered something that is not its JSON."""

    message = UNREACHABLE


@dataclass(frozen=True)
class WxSession:
    """What a login yields. WeChat's session_key is dropped where it arrives: nothing here needs it."""

    openid: str
    unionid: str | None = None


class WeChatApi(Protocol):
    """The WeChat server APIs the login and the content check use (implemented in upstream/wechat.py)."""

    async def code2session(self, code: str) -> WxSession:
        """Exchange a one-time `wx.login` code for the user's openid."""

    async def msg_sec_check(self, content: str, openid: str) -> Suggest:
        """WeChat's verdict on at most 2,500 characters written for `openid`."""


def login_refusal(errcode: int, errmsg: str = "") -> WeChatRefused:
    """The exception for a login WeChat refused, with the user's text for its errcode."""
    if errcode in CONFIG_ERRCODES:
        return WeChatRefused(errcode, CONFIG_FAILED, errmsg)
    return WeChatRefused(errcode, LOGIN_MESSAGES.get(errcode, LOGIN_FAILED), errmsg)


def valid_code(code: object) -> TypeGuard[str]:
    """Whether a login body's `code` looks like a wx.login code (checked before WeChat is asked)."""
    return isinstance(code, str) and _CODE.fullmatch(code) is not None


def payer_key(openid: str) -> str:
    """The quota key of a logged-in WeChat user (the IP's key is the address itself)."""
    return f"wx:{openid}"
