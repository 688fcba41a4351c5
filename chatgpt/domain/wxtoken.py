"""Login tokens for WeChat users: the server signs the openid and an expiry; nothing else is in them."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

VERSION = "1"
MAX_TOKEN_CHARS = 512  # a real token is ~100 characters; longer input is refused before any decoding
_OPENID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # WeChat openids are 28 such characters
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class InvalidToken(Exception):
    """A token that is malformed, not signed by this server, or expired; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"login token {reason}")
        self.reason = reason  # "malformed" | "forged" | "expired"


@dataclass(frozen=True)
class IssuedToken:
    """What the login answers: the token and its lifetime in seconds."""

    token: str
    expires_in: int


def secret_from_setting(value: str) -> bytes:
    """The signing secret: `wechat.token_secret` when set, else 32 random bytes (tokens end with the process)."""
    return value.encode("utf-8") if value else os.urandom(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise InvalidToken("malformed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None


class TokenSigner:
    """Issues and verifies tokens `base64url(payload).base64url(HMAC-SHA256(payload))`.

    The payload is `1:<expiry unix seconds>:<openid>`: compact, and never the session_key."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("token secret: expected at least 16 bytes")
        self._secret = secret
        self._clock = clock

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, openid: str, lifetime: int) -> IssuedToken:
        """A token for `openid` valid for `lifetime` seconds from now."""
        if not _OPENID.fullmatch(openid):
            raise ValueError("openid: unexpected characters or length")
        expiry = int(self._clock()) + lifetime
        payload = f"{VERSION}:{expiry}:{openid}".encode("ascii")
        return IssuedToken(f"{_b64(payload)}.{_b64(self._sign(payload))}", lifetime)

    def verify(self, token: object) -> str:
        """The openid a valid token carries; InvalidToken otherwise. The signature is checked first."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS or token.count(".") != 1:
            raise InvalidToken("malformed")
        head, _, tail = token.partition(".")
        payload, signature = _unb64(head), _unb64(tail)
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise InvalidToken("forged")
        # Signed by us, so well formed unless the format changed: still parsed defensively.
        version, _, rest = payload.decode("ascii", "replace").partition(":")
        expiry_text, _, openid = rest.partition(":")
        if version != VERSION or not (expiry_text.isascii() and expiry_text.isdigit()) or not _OPENID.fullmatch(openid):
            raise InvalidToken("malformed")
        if int(expiry_text) <= self._clock():
            raise InvalidToken("expired")
        return openid
