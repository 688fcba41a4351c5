"""The OpenAI-compatible upstream: streamed chat completions through aiohttp-sse-client, made safe."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp_sse_client.client import EventSource

from .. import jsontext
from ..errors import UpstreamBroken, UpstreamError, UpstreamUnreachable
from . import ChatRequest, Delta, GeneratedImage

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
    `UpstreamError` before aiohttp-sse-client sees it, so its JSON body is readable and the
    response is closed instead of leaking."""
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


def _delta_of(data: str, fallback_id: str) -> Delta | None:
    """One SSE `data:` payload to a Delta; None for chunks without text (role, usage)."""
    try:
        chunk = jsontext.parse(data)
    except ValueError:
        raise UpstreamBroken("upstream sent a line that is not JSON") from None
    if not isinstance(chunk, dict):
        raise UpstreamBroken("upstream sent a chunk that is not an object")
    if isinstance(chunk.get("error"), (dict, str)):
        raise UpstreamError(500, data.encode())  # an error reported inside the stream
    answer_id = chunk.get("id") if isinstance(chunk.get("id"), str) and chunk.get("id") else fallback_id
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
    text = delta.get("content") if isinstance(delta.get("content"), str) else ""
    finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    if not text and finish is None:
        return None
    return Delta(answer_id, text, finish)


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
        """Relay the upstream's deltas until `[DONE]`."""
        opened = False

        def on_open() -> None:
            nonlocal opened
            opened = True

        def on_error() -> None:
            # Called when the stream ends without [DONE]: the library would then re-POST the
            # same body (a second billed answer). Raising here stops it. Before the response is
            # open, let the library raise its own connection error instead.
            if opened:
                raise UpstreamBroken("upstream stream ended before [DONE]")

        fallback_id = ""
        try:
            async with EventSource(
                f"{self._base_url}/chat/completions",
                option={"method": "POST"},
                session=self._session,
                max_connect_retry=0,
                on_open=on_open,
                on_error=on_error,
                json=self._body(request),
                headers={"Authorization": f"Bearer {key or ''}"},
            ) as source:
                async for event in source:
                    if event.data == "[DONE]":
                        return
                    delta = _delta_of(event.data, fallback_id)
                    if delta is not None:
                        fallback_id = delta.answer_id
                        yield delta
        except (UpstreamError, UpstreamBroken):
            raise
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamBroken(f"upstream stream broke: {type(exc).__name__}") from None
        except TimeoutError:
            if opened:
                raise UpstreamBroken("upstream sent nothing within the read timeout") from None
            raise UpstreamUnreachable("upstream did not accept the connection in time") from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            if opened:
                raise UpstreamBroken(f"upstream connection lost: {type(exc).__name__}") from None
            raise UpstreamUnreachable(f"upstream unreachable: {type(exc).__name__}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            # The library decodes lines itself: invalid UTF-8 or an over-long line lands here.
            raise UpstreamBroken(f"upstream sent unreadable data: {type(exc).__name__}") from None

    async def verify_key(self, key: str) -> None:
        """`GET /models` with `key`; returns on success, raises an upstream exception otherwise."""
        try:
            async with self._session.get(f"{self._base_url}/models",
                                         headers={"Authorization": f"Bearer {key}"}) as response:
                await response.release()
        except UpstreamError:
            raise
        except TimeoutError:
            raise UpstreamBroken("upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"upstream unreachable: {type(exc).__name__}") from None

    async def key_works(self, key: str) -> bool:
        """A re-probe of a disabled server key: True when the upstream accepts it again."""
        try:
            await self.verify_key(key)
        except (UpstreamError, UpstreamBroken, UpstreamUnreachable):
            return False
        return True

    async def generate_image(self, prompt: str, size: str, key: str | None) -> GeneratedImage:
        """`POST {base_url}/images/generations` (n=1); exactly one POST, never retried here."""
        body = {"prompt": prompt, "n": 1, "size": size}
        try:
            async with self._session.post(f"{self._base_url}/images/generations", json=body,
                                          headers={"Authorization": f"Bearer {key or ''}"}) as response:
                raw = await _read_capped(response, IMAGE_ANSWER_LIMIT)
        except UpstreamError:
            raise
        except TimeoutError:
            raise UpstreamBroken("the image upstream did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"upstream unreachable: {type(exc).__name__}") from None
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
