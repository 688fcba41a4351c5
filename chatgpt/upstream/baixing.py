"""The Baixing relay (the seed's second provider): one prompt in, one whole answer out, no context."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import aiohttp

from chatgpt import jsontext
from chatgpt.domain.errors import UpstreamBroken, UpstreamError
from chatgpt.domain.provider import ChatRequest, Delta
from chatgpt.upstream.network import upstream_call

ANSWER_LIMIT = 1024 * 1024


def last_prompt(request: ChatRequest) -> str:
    """Baixing takes no context: only the newest user message is sent."""
    for message in reversed(request.messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


class BaixingProvider:
    """`POST <url>` with `{"p": prompt, "k": key}` → `{"code": 0, "data": answer, "message": ...}`."""

    name = "baixing"

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str) -> None:
        self._session = session
        self._url = url
        self._key = key

    async def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[Delta]:
        """Yield the whole answer as one delta, `[*]` markers removed; `code != 0` is an error."""
        with upstream_call("Baixing relay"):
            async with self._session.post(self._url, json={"p": last_prompt(request), "k": self._key}) as response:
                raw = await response.content.read(ANSWER_LIMIT)
        try:
            data = jsontext.parse(raw)
        except ValueError:
            raise UpstreamBroken("the Baixing relay answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise UpstreamBroken("the Baixing relay answered something that is not an object")
        if data.get("code") != 0:
            message = data.get("message") if isinstance(data.get("message"), str) else None
            raise UpstreamError(502, json.dumps({"error": {"message": message}}).encode())
        answer = data.get("data") if isinstance(data.get("data"), str) else ""
        answer_id = f"baixing-{uuid.uuid4().hex[:24]}"
        yield Delta(answer_id, answer.replace("[*]", ""))
        yield Delta(answer_id, "", "stop")
