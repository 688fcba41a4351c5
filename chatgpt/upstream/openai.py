"""The OpenAI-compatible upstream: streamed chat completions (read through `events`), key checks and
pictures. Exactly one POST per question, never a retry here."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp

from chatgpt import jsontext
from chatgpt.domain.errors import UpstreamBroken, UpstreamError, UpstreamUnreachable
from chatgpt.domain.failover import host_of
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage
from chatgpt.upstream.chunks import delta_of
from chatgpt.upstream.events import event_payloads
from chatgpt.upstream.network import upstream_call
from chatgpt.upstream.session import SSE, read_capped

IMAGE_ANSWER_LIMIT = 32 * 1024 * 1024  # one base64 picture of the largest size fits


class OpenAIProvider:
    """`POST {base_url}/chat/completions`; `read_timeout` bounds the wait for each answer event (or a
    key check), `answer_timeout` one whole answer (or picture). `usage` False: the upstream is not
    asked for `stream_options.include_usage` (some compatible servers refuse the field)."""

    name = "openai"

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, read_timeout: float = 60.0,
                 answer_timeout: float = 600.0, usage: bool = True) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._host = host_of(base_url)
        self._read_timeout = read_timeout
        self._answer_timeout = answer_timeout
        self._usage = usage

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = dict(request.extra)
        body.update(model=request.model, messages=request.messages, stream=True)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            # The (capped) limit goes under the name(s) the caller used: newer OpenAI models refuse
            # `max_tokens` and want `max_completion_tokens`.
            for name in [n for n in ("max_tokens", "max_completion_tokens") if n in body] or ["max_tokens"]:
                body[name] = request.max_tokens
        if self._usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def _headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or ''}", "Accept": SSE, "Content-Type": "application/json"}

    def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[list[Delta]]:
        """The answer's deltas, one per upstream event, until `[DONE]`; a batch per network read."""
        body = jsontext.dumpb(self._body(request))
        return event_payloads(self._session, f"{self._base_url}/chat/completions", body, self._headers(key),
                              host=self._host, read_timeout=self._read_timeout, answer_timeout=self._answer_timeout,
                              parse=partial(delta_of, self._host))

    async def verify_key(self, key: str) -> None:
        """`GET /models` with `key`; returns on success, raises an upstream exception otherwise."""
        with upstream_call(self._host):
            async with asyncio.timeout(self._read_timeout):
                async with self._session.get(f"{self._base_url}/models",
                                             headers={"Authorization": f"Bearer {key}"}) as response:
                    await response.release()

    async def key_works(self, key: str) -> bool:
        """A re-probe of a disabled server key: True when the upstream accepts it again."""
        try:
            await self.verify_key(key)
        except (UpstreamError, UpstreamBroken, UpstreamUnreachable):
            return False
        return True

    async def generate_image(self, prompt: str, size: str, key: str | None,
                             model: str | None = None) -> GeneratedImage:
        """`POST {base_url}/images/generations` (n=1); exactly one POST, never retried here."""
        body: dict[str, Any] = {"prompt": prompt, "n": 1, "size": size}
        if model:
            body["model"] = model
        with upstream_call(self._host):
            async with asyncio.timeout(self._answer_timeout):  # drawing takes a minute or more
                async with self._session.post(f"{self._base_url}/images/generations", json=body,
                                              headers={"Authorization": f"Bearer {key or ''}"}) as response:
                    raw = await read_capped(response, IMAGE_ANSWER_LIMIT)
        return _image_of(raw)


def _image_of(raw: bytes) -> GeneratedImage:
    """The first picture of an images answer, as a URL or base64."""
    try:
        data = jsontext.parse(raw)
        first = data["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UpstreamBroken("The image upstream answered without a picture.") from None
    url, b64 = (first.get("url"), first.get("b64_json")) if isinstance(first, dict) else (None, None)
    if isinstance(b64, str) and b64:
        return GeneratedImage(b64=b64)
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return GeneratedImage(url=url)
    raise UpstreamBroken("The image upstream answered without a picture.")
