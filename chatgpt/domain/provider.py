"""Upstream providers behind one small interface: a chat request in, answer deltas out."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ChatRequest:
    """What is asked of a provider: OpenAI-shaped messages and sampling options."""

    messages: list[dict[str, Any]]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other OpenAI options, passed through


@dataclass(frozen=True)
class Delta:
    """One new piece of an answer (all that one network read brought); `answer_id` is the same for
    every piece of one answer."""

    answer_id: str
    text: str
    finish_reason: str | None = None
    raw: bytes = b""  # the upstream's own SSE events behind this piece (`data: ...` lines), relayed as is on /v1
    last: bool = False  # the upstream ended the answer in the same read: nothing follows this piece
    usage: dict[str, int] | None = None  # token counts, when the upstream reported them in this read


@dataclass(frozen=True)
class GeneratedImage:
    """An upstream picture: a URL to download (it expires within hours) or base64 bytes."""

    url: str | None = None
    b64: str | None = None


class Provider(Protocol):
    """An upstream that streams an answer. `key` is the upstream API key, when the provider needs one."""

    name: str

    def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[Delta]:
        """Yield the answer's deltas; raise an upstream exception from `chatgpt.domain.errors` on failure."""
        ...

    async def generate_image(self, prompt: str, size: str, key: str | None,
                             model: str | None = None) -> GeneratedImage:
        """One picture for `prompt` (by `model`, else the upstream's default); raise an upstream exception from `chatgpt.domain.errors` on failure."""
        ...
