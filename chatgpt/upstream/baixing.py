"""The Baixing relay (the seed's second provider): one prompt in, one whole answer out, no context."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import aiohttp

from chatgpt import jsontext
from chatgpt.domain.errors import UpstreamBroken, UpstreamError
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage
from chatgpt.domain.failover import host_of
from chatgpt.upstream.network import upstream_call

ANSWER_LIMIT = 1024 * 1024


def last_prompt(request: ChatRequest) -> str:
    """Baixing takes no context: only the newest user message is sent."""
    for message in reversed(request.messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            return content
    return ""


class BaixingProvider:
    """`POST <url>` with `{"p": prompt, "k": key}` → `{"code": 0, "data": answer, "message": ...}`."""

    name = "baixing"

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str, answer_timeout: float = 600.0) -> None:
        self._session = session
        self._url = url
        self._key = key
        self._answer_timeout = answer_timeout  # the relay answers whole, so only the answer's cap applies

    async def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[list[Delta]]:
        """Yield the whole answer as one delta, `[*]` markers removed; `code != 0` is an error."""
        with upstream_call(host_of(self._url)):
            async with asyncio.timeout(self._answer_timeout):
                async with self._session.post(self._url, json={"p": last_prompt(request), "k": self._key}) as response:
                    raw = await response.content.read(ANSWER_LIMIT)
        try:
            data = jsontext.parse(raw)
        except ValueError:
            raise UpstreamBroken("The Baixing relay answered something that is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamBroken("The Baixing relay answered something that is not an object.")
        if data.get("code") != 0:
            message = data.get("message") if isinstance(data.get("message"), str) else None
            raise UpstreamError(502, json.dumps({"error": {"message": message}}).encode(), host=host_of(self._url))
        answer = data.get("data")
        answer = answer if isinstance(answer, str) else ""
        answer_id = f"baixing-{uuid.uuid4().hex[:24]}"
        yield [Delta(answer.replace("[*]", ""), answer_id=answer_id), Delta(finish_reason="stop", answer_id=answer_id)]

    async def generate_image(self, prompt: str, size: str, key: str | None,
                             model: str | None = None) -> GeneratedImage:
        """The relay only chats (pictures never go to it; the interface asks for the method)."""
        raise UpstreamBroken("The Baixing relay draws no pictures.")
