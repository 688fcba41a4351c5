"""A question as every entry point hands it to the pipeline: who pays, which context, which model."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from chatgpt.domain import texts
from chatgpt.domain.errors import BadQuestion, EmptyContext, PromptTooLong
from chatgpt.domain.wechat import payer_key

ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class Payer:
    """Who pays for a question: the anonymous pool (daily quota), a trusted client, or the caller's key."""

    kind: Literal["anonymous", "trusted", "own"]
    key: str | None = None  # the caller's own upstream key, never stored or logged

    @classmethod
    def from_bearer(cls, authorization: str | None, client_tokens: Sequence[str]) -> Payer:
        """PROTOCOL.md B.1: no bearer → anonymous; a client token → trusted; anything else → own key."""
        value = (authorization or "").strip()
        scheme, _, token = value.partition(" ")
        if not value or scheme.lower() != "bearer" or not token.strip():
            return cls("anonymous")
        token = token.strip()
        if token in client_tokens:
            return cls("trusted")
        return cls("own", token)


@dataclass(frozen=True)
class Question:
    """A validated question from any entry point."""

    entry: str  # the door it came through: "ws", "v1" or "chat" (limits, logs and metrics)
    identity: str  # the client IP (PROTOCOL.md C.3)
    payer: Payer
    messages: list[dict[str, Any]]
    model: str | None = None  # as the client asked; the pipeline's model rule decides (PROTOCOL.md E.1)
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The openid of a mini-program user logged in with WeChat (a valid `token` on the frame), else None.
    user: str | None = None

    @property
    def account(self) -> str:
        """Whose daily quota the question counts against: the logged-in WeChat user (`wx:<openid>`), else
        the address. Carrier NAT puts many users behind one address (PROTOCOL.md E.5)."""
        return payer_key(self.user) if self.user else self.identity

    @property
    def prompt(self) -> str:
        """The newest user message's text (a content-parts list: its text parts), what content checks read."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return text_of(message.get("content"))
        return ""


def text_of(content: Any) -> str:
    """The text of a message's content: the string itself, or the `text` parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def content_size(content: Any) -> int:
    """Characters a message's content costs against the context budget."""
    return len(content) if isinstance(content, str) else len(json.dumps(content, ensure_ascii=False))


def fit_context(history: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Drop the oldest messages until the rest fit `budget` characters; the newest always stays."""
    if not history:
        raise EmptyContext(texts.MESSAGES_EMPTY, "messages")
    if content_size(history[-1].get("content")) > budget:
        raise PromptTooLong(texts.PROMPT_TOO_LONG, budget)
    kept: list[dict[str, Any]] = []
    used = 0
    for message in reversed(history):
        used += content_size(message.get("content"))
        if used > budget:
            break
        kept.append(message)
    kept.reverse()
    return kept


def clean_messages(items: Any) -> list[dict[str, str]]:
    """Client context items to `{role, content}`: extra keys dropped, blank and unknown-role ones skipped."""
    if not isinstance(items, list):
        raise BadQuestion(texts.FRAME_BAD_FIELD.format(field="messages"), "messages")
    cleaned = []
    for item in items:
        if not isinstance(item, dict):
            raise BadQuestion(texts.FRAME_BAD_FIELD.format(field="messages"), "messages")
        role, content = item.get("role"), item.get("content")
        if role in ROLES and isinstance(content, str) and content.strip():
            cleaned.append({"role": role, "content": content})
    return cleaned
