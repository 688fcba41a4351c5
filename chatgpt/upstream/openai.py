"""The OpenAI-compatible upstream: streamed chat completions, decoded a network read at a time."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from chatgpt import jsontext
from chatgpt.domain.errors import UpstreamBroken, UpstreamError, UpstreamUnreachable
from chatgpt.upstream.sse import SSEDecoder
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage
from chatgpt.domain.usage import usage_counts
from chatgpt.upstream.network import upstream_call

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024  # enough for any error JSON; an endless error body is not read
IMAGE_ANSWER_LIMIT = 32 * 1024 * 1024  # one base64 picture of the largest size fits


async def _read_capped(response: aiohttp.ClientResponse, limit: int = ERROR_BODY_LIMIT) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def raise_for_upstream_status(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a non-2xx answer (or a 2xx that is not the SSE asked for) becomes
    `UpstreamError` before any caller reads it, with its (capped) JSON body readable and the
    response closed instead of leaking."""
    response = await handler(request)
    wants_sse = request.headers.get("Accept") == "text/event-stream"
    if 200 <= response.status < 300 and (not wants_sse or response.content_type == "text/event-stream"):
        return response
    try:
        body = await _read_capped(response)
    except (TimeoutError, aiohttp.ClientError):
        body = b""
    finally:
        response.close()
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("retry-after")}
    raise UpstreamError(response.status, body, headers)


def make_session(connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """The app's one upstream session. total=None: aiohttp's default 300 s would cut long answers."""
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout,
                                    sock_read=read_timeout)
    # limit=0: aiohttp's default pool of 100 connections would make the 101st concurrent answer wait
    # for a free connection and then fail as "unreachable"; answers are long-lived streams.
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, middlewares=(raise_for_upstream_status,))


def _piece(chunk: Any) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, id) of one chat.completion.chunk; checked without trusting its shape."""
    if not isinstance(chunk, dict):
        raise UpstreamBroken("upstream sent a chunk that is not an object")
    if "error" in chunk and isinstance(chunk["error"], (dict, str)):
        raise UpstreamError(500, jsontext.dumps(chunk).encode())  # an error reported inside the stream
    try:  # the shape of nearly every chunk: one try instead of a check per level
        choice = chunk["choices"][0]
        text = choice["delta"].get("content")
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        text = finish = None
    answer_id = chunk.get("id")
    return (text if isinstance(text, str) else "", finish if isinstance(finish, str) else None,
            answer_id if isinstance(answer_id, str) else None)


_DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"


def _event(payload: bytes) -> bytes:
    """One SSE event carrying `payload`; a payload of several lines needs a `data:` field per line."""
    return b"data: " + payload.replace(b"\n", b"\ndata: ") + b"\n\n"


def _batch(decoder: SSEDecoder, chunk: bytes, answer_id: str) -> tuple[Delta | None, bool]:
    """The events of one network read as one Delta (their texts joined, their SSE bytes kept for a
    verbatim /v1 relay), and whether `[DONE]` was among them."""
    payloads = decoder.feed(chunk)
    texts: list[str] = []
    finish = None
    done = False
    count = 0
    usage = None
    for payload in payloads:
        if payload == _DONE:
            done = True
            break
        parsed = jsontext.parse(payload)
        text, ended, chunk_id = _piece(parsed)
        if isinstance(parsed, dict) and "usage" in parsed:  # the usage-only chunk near the end
            usage = usage_counts(parsed["usage"]) or usage
        if text:
            texts.append(text)
        if ended:
            finish = ended
        if not answer_id and chunk_id:
            answer_id = chunk_id
        count += 1
    if not count:
        return None, done
    wire = decoder.verbatim
    if wire is not None and done:
        # The relay sends [DONE] itself at the end: cut it off when it was the read's last event
        # (verbatim bytes are exactly `data: <payload>\n\n` per payload); events after it are dropped.
        wire = wire[:-len(_DONE_EVENT)] if count == len(payloads) - 1 else None
    if wire is None:  # other events were mixed in (comments, several lines): the payloads in canonical form
        wire = b"".join(_event(p) for p in payloads[:count])
    return Delta(answer_id, "".join(texts), finish, wire, done, usage), done


class OpenAIProvider:
    """Streams `POST {base_url}/chat/completions`; exactly one POST per question, never a retry."""

    name = "openai"

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = dict(request.extra)
        body.update(model=request.model, messages=request.messages, stream=True)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        return body

    async def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[Delta]:
        """Relay the upstream's answer until `[DONE]`: one Delta per network read, never a retry."""
        headers = {"Authorization": f"Bearer {key or ''}", "Accept": "text/event-stream", "Cache-Control": "no-cache",
                   "Content-Type": "application/json"}
        opened = False
        with upstream_call("chat stream", lambda: opened):
            body = jsontext.dumpb(self._body(request))
            async with self._session.post(f"{self._base_url}/chat/completions", data=body,
                                          headers=headers) as response:
                opened = True
                decoder, answer_id = SSEDecoder(), ""
                while True:
                    chunk = await response.content.readany()
                    if not chunk:
                        # Ended without [DONE]: an answer cut short. Nothing is re-sent: the
                        # upstream may already have billed it.
                        raise UpstreamBroken("upstream stream ended before [DONE]")
                    delta, done = _batch(decoder, chunk, answer_id)
                    if delta is not None:
                        answer_id = delta.answer_id
                        yield delta
                    if done:
                        return

    async def verify_key(self, key: str) -> None:
        """`GET /models` with `key`; returns on success, raises an upstream exception otherwise."""
        with upstream_call("key check"):
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
        with upstream_call("image generation"):
            async with self._session.post(f"{self._base_url}/images/generations", json=body,
                                          headers={"Authorization": f"Bearer {key or ''}"}) as response:
                raw = await _read_capped(response, IMAGE_ANSWER_LIMIT)
        return _image_of(raw)


def _image_of(raw: bytes) -> GeneratedImage:
    """The first picture of an images answer, as a URL or base64."""
    try:
        data = jsontext.parse(raw)
        first = data["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise UpstreamBroken("the image upstream answered without a picture") from None
    url, b64 = (first.get("url"), first.get("b64_json")) if isinstance(first, dict) else (None, None)
    if isinstance(b64, str) and b64:
        return GeneratedImage(b64=b64)
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return GeneratedImage(url=url)
    raise UpstreamBroken("the image upstream answered without a picture")
