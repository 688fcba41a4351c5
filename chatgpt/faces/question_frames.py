"""What a mini-program question frame says (PROTOCOL.md A.3): its fields' types checked, the prompt,
who pays, and the conversation id to echo."""
from __future__ import annotations

from typing import Any

from chatgpt.domain import texts
from chatgpt.domain.errors import BadQuestion
from chatgpt.domain.question import Payer
from chatgpt.settings import Settings

_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "parentId": (str, int, float), "authType": (str,), "authValue": (str,),
    "isDemo": (bool,), "content": (str,), "messages": (list,), "isGenImg": (bool,),
    "isSender": (bool,), "model": (str,), "conversationId": (str, int, float, bool), "token": (str,),
}


def check_types(frame: dict[str, Any]) -> None:
    """Every known field must have its contract type (null counts as absent)."""
    for name, kinds in _TYPES.items():
        value = frame.get(name)
        if value is not None and not isinstance(value, kinds):
            raise BadQuestion(texts.FRAME_BAD_FIELD.format(field=name), name)


def prompt_of(frame: dict[str, Any], history: list[dict[str, str]]) -> str:
    """The question's prompt: `content` in image mode, else the last user entry of `messages`."""
    if frame.get("isGenImg") or not history:
        return (frame.get("content") or "").strip()
    users = [m["content"] for m in history if m["role"] == "user"]
    return users[-1].strip() if users else ""


def payer_of(frame: dict[str, Any], settings: Settings) -> Payer:
    """`isDemo` → the server's pool under the daily quota; `authType: api` → the user's own key."""
    if frame.get("isDemo"):
        return Payer("anonymous")
    if frame.get("authType") != "api":
        raise BadQuestion(texts.TOKEN_MODE_GONE, "authType")
    payer = Payer.from_bearer(frame.get("authValue"), settings.api.client_tokens)
    if payer.kind == "anonymous":
        raise BadQuestion(texts.API_KEY_BLANK, "authValue")
    return payer


def cid_of(frame: dict[str, Any]) -> Any:
    """The conversationId to echo: exactly as sent when it is a JSON scalar, else left out."""
    cid = frame.get("conversationId")
    return cid if isinstance(cid, (str, int, float, bool)) else None
