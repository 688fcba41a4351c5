"""Upstream providers behind one small interface: a chat request in, answer deltas out."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ChatRequest:
    """What is asked of a provider: OpenAI-shaped messages and sampling options. `extra` holds the
    other request fields of an OpenAI caller (tools, response_format, stream_options...), passed on
    as they came."""

    messages: list[dict[str, Any]]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the upstream counted for one answer (`reasoning` is part of `completion`)."""

    prompt: int = 0
    completion: int = 0
    reasoning: int = 0

    def counts(self) -> dict[str, int]:
        """`{"prompt", "completion", "reasoning"}` as the usage store keeps them (zeros left out)."""
        return {k: n for k, n in (("prompt", self.prompt), ("completion", self.completion),
                                  ("reasoning", self.reasoning)) if n}


@dataclass(slots=True)  # not frozen: one is made per upstream event, and frozen ones cost twice as much
class Delta:
    """One event of an answer: what it adds to the answer text, to the reasoning, whether it carries
    (part of) a tool call, the usage when the upstream reports it, and the event's own data text
    (`payload`, relayed as is on `/v1`; "" when the provider has no OpenAI events of its own)."""

    text: str = ""
    reasoning: str = ""
    tool_call: bool = False
    usage: Usage | None = None
    payload: str = ""
    finish_reason: str | None = None
    answer_id: str = ""  # the upstream's id for the answer ("" when it sent none)

    @property
    def usage_only(self) -> bool:
        """An event that carries nothing but the usage (OpenAI's last chunk, `choices: []`)."""
        return self.usage is not None and not (self.text or self.reasoning or self.tool_call or self.finish_reason)


@dataclass(frozen=True)
class GeneratedImage:
    """An upstream picture: a URL to download (it expires within hours) or base64 bytes."""

    url: str | None = None
    b64: str | None = None


class Provider(Protocol):
    """An upstream that streams an answer. `key` is the upstream API key, when the provider needs one."""

    name: str

    def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[list[Delta]]:
        """Yield the answer's deltas in batches (never empty): those that arrived together, e.g. the
        events of one network read; raise an upstream exception from `chatgpt.domain.errors` on failure."""
        ...

    async def generate_image(self, prompt: str, size: str, key: str | None,
                             model: str | None = None) -> GeneratedImage:
        """One picture for `prompt` (by `model`, else the upstream's default); raise an upstream exception from `chatgpt.domain.errors` on failure."""
        ...
