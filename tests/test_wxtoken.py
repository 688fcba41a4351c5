"""Login tokens (PROTOCOL.md E.5): issued for an openid with a lifetime; forged, expired or malformed ones refused."""
from __future__ import annotations

import base64

import pytest

from chatgpt.domain.wxtoken import InvalidToken, TokenSigner, secret_from_setting

SECRET = b"s" * 32
OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"


class Clock:
    """Fake wall-clock time, moved by the test."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reason(signer: TokenSigner, token: object) -> str:
    """Why `signer` refuses `token`."""
    with pytest.raises(InvalidToken) as caught:
        signer.verify(token)
    return caught.value.reason


def test_a_token_carries_its_openid_until_it_expires() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    issued = signer.issue(OPENID, 30 * 86400)
    assert issued.expires_in == 30 * 86400
    assert signer.verify(issued.token) == OPENID
    clock.now += 30 * 86400 - 1
    assert signer.verify(issued.token) == OPENID
    clock.now += 1
    assert reason(signer, issued.token) == "expired"


def test_the_token_holds_the_openid_and_expiry_only() -> None:
    clock = Clock()
    token = TokenSigner(SECRET, clock).issue(OPENID, 60).token
    head = token.split(".")[0]
    assert base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)) == f"1:{1_700_000_060}:{OPENID}".encode()


def test_a_token_signed_with_another_secret_or_edited_is_forged() -> None:
    clock = Clock()
    signer = TokenSigner(SECRET, clock)
    other = TokenSigner(b"t" * 32, clock).issue(OPENID, 60).token
    assert reason(signer, other) == "forged"
    # a longer lifetime, re-encoded without the secret, does not verify
    good = signer.issue(OPENID, 60).token
    longer = base64.urlsafe_b64encode(f"1:{1_800_000_000}:{OPENID}".encode()).rstrip(b"=").decode()
    assert reason(signer, f"{longer}.{good.split('.')[1]}") == "forged"
    # another user's openid with this user's signature
    someone = base64.urlsafe_b64encode(f"1:{1_700_000_060}:oSomeoneElse".encode()).rstrip(b"=").decode()
    assert reason(signer, f"{someone}.{good.split('.')[1]}") == "forged"


@pytest.mark.parametrize("token", [
    None, 42, "", "abc", "a.b.c", "..", "!!!.???", "a" * 600, "YQ.YQ\n", "x.", ".x", ["a.b"],
])
def test_malformed_tokens_are_refused_as_malformed_or_forged(token: object) -> None:
    assert reason(TokenSigner(SECRET, Clock()), token) in ("malformed", "forged")


def test_a_signed_payload_of_another_format_is_malformed() -> None:
    import hashlib
    import hmac

    payload = b"2:9999999999:" + OPENID.encode()
    signature = hmac.new(SECRET, payload, hashlib.sha256).digest()
    token = ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in (payload, signature))
    assert reason(TokenSigner(SECRET, Clock()), token) == "malformed"


def test_the_secret_comes_from_the_setting_or_is_random() -> None:
    assert secret_from_setting("a-configured-secret-of-some-length") == b"a-configured-secret-of-some-length"
    first, second = secret_from_setting(""), secret_from_setting("")
    assert len(first) == 32 and first != second
    with pytest.raises(ValueError):
        TokenSigner(b"short")
