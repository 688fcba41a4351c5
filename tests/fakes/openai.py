"""A fake OpenAI upstream: a real aiohttp application whose answers each test scripts."""
from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Stream:
    """Stream `pieces` as chat.completion chunks, `delay` seconds apart; optionally break off.

    Like the real upstreams: `reasoning` pieces come first as `delta.<reasoning_field>` (DeepSeek,
    Qwen: reasoning_content; OpenRouter: reasoning); `tool_calls` are streamed as fragments (index, id,
    function.name, then the arguments in pieces); `comments` are sent before the first chunk (e.g.
    `: OPENROUTER PROCESSING`); the usage comes as a last chunk with empty `choices` when the request
    asked `stream_options.include_usage` (OpenAI, DeepSeek), or inside `choices[0]` of the finishing
    chunk when `usage_in_choice` (Kimi). A request with `stream: false` gets the same answer whole."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "**world**", "!"])
    delay: float = 0.0
    answer_id: str | None = "chatcmpl-fake-1"  # the same for every answer, as compatible upstreams do; None omits it
    done: bool = True  # False: end the stream after the pieces without [DONE]
    hang: bool = False  # True: after the pieces, send nothing until the client gives up
    reasoning: list[str] = field(default_factory=list)
    reasoning_field: str = "reasoning_content"
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "name", "arguments"}]
    comments: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = field(default_factory=lambda: {"prompt_tokens": 9, "completion_tokens": 12,
                                                                   "total_tokens": 21})
    usage_in_choice: bool = False
    keep_alive: float = 0.0  # > 0: while hanging, a `: keep-alive` comment this often (DeepSeek's queue)

    @property
    def finish(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def whole(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """The same answer as one non-streamed chat.completion."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.pieces) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [{"id": t["id"], "type": "function",
                                      "function": {"name": t["name"], "arguments": t["arguments"]}}
                                     for t in self.tool_calls]
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self.finish,
                                  "logprobs": None}
        if request.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": p, "logprob": -0.5, "bytes": list(p.encode()),
                                               "top_logprobs": []} for p in self.pieces]}
        answer: dict[str, Any] = {"id": self.answer_id, "object": "chat.completion", "created": 1, "model": model,
                                  "choices": [choice], "system_fingerprint": "fp_fake"}
        if self.answer_id is None:
            del answer["id"]
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer


@dataclass
class Fail:
    """Answer with an HTTP error status and body (OpenAI error JSON unless given raw bytes)."""

    status: int
    message: str | None = "fake failure"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


class FakeOpenAI:
    """Scripted upstream. `script` answers chat requests in order; `default` answers the rest."""

    def __init__(self) -> None:
        self.script: deque[Stream | Fail] = deque()
        self.default: Stream | Fail = Stream()
        self.requests: list[Recorded] = []
        self.valid_keys: set[str] | None = None  # None: every key is accepted by /models
        self.deactivated_keys: set[str] = set()
        self.disconnects = 0  # streams the client closed before they ended
        self.disconnected = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)

    def chat_requests(self) -> list[Recorded]:
        """Chat completion POSTs received so far."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Recorded(request.method, request.path, request.headers.get("Authorization"), body))
        behaviour = self.script.popleft() if self.script else self.default
        if isinstance(behaviour, Fail):
            return self._fail(behaviour)
        model = body.get("model", "gpt-3.5-turbo")
        if body.get("stream") is not True:
            return web.json_response(behaviour.whole(model, body))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self._write(response, behaviour, model, body)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        return response

    async def _write(self, response: web.StreamResponse, s: Stream, model: str, request: dict[str, Any]) -> None:
        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
            data: dict[str, Any] = {"id": s.answer_id, "object": "chat.completion.chunk", "created": 1,
                                    "model": model, "system_fingerprint": "fp_fake", "choices": [] if delta is None
                                    else [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            text = (delta or {}).get("content")
            if request.get("logprobs") and data["choices"]:
                data["choices"][0]["logprobs"] = {"content": [{"token": text, "logprob": -0.5, "bytes": list(
                    text.encode()), "top_logprobs": []}] if text else [], "refusal": None}
            if s.answer_id is None:
                del data["id"]
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        async def send(data: bytes) -> None:
            if s.delay:
                await asyncio.sleep(s.delay)
            await response.write(data)

        for comment in s.comments:
            await response.write(f": {comment}\n\n".encode())
        await response.write(chunk({"role": "assistant", "content": ""}))
        for piece in s.reasoning:
            await send(chunk({"content": None if s.reasoning_field == "reasoning_content" else "",
                              s.reasoning_field: piece}))
        for piece in s.pieces:
            await send(chunk({"content": piece}))
        for index, call in enumerate(s.tool_calls):
            await send(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                              "function": {"name": call["name"], "arguments": ""}}]}))
            arguments = call["arguments"]
            for start in range(0, len(arguments), 7):
                await send(chunk({"tool_calls": [{"index": index,
                                                  "function": {"arguments": arguments[start:start + 7]}}]}))
        if s.hang:
            while s.keep_alive:
                await asyncio.sleep(s.keep_alive)
                await response.write(b": keep-alive\n\n")
            await asyncio.sleep(3600)
        if not s.done:
            return  # ends the body without [DONE]: a stream that broke off
        if s.usage_in_choice and s.usage is not None:
            finishing = chunk({}, s.finish)
            data = json.loads(finishing[6:])
            data["choices"][0]["usage"] = s.usage
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        else:
            await response.write(chunk({}, s.finish))
        options = request.get("stream_options")
        if s.usage is not None and not s.usage_in_choice and isinstance(options, dict) and options.get("include_usage"):
            await response.write(chunk(None, usage=s.usage))
        await response.write(b"data: [DONE]\n\n")

    @staticmethod
    def _fail(f: Fail) -> web.Response:
        if f.raw is not None:
            return web.Response(status=f.status, body=f.raw, headers=f.headers)
        error = {"message": f.message, "type": "fake_error", "param": None, "code": f.code}
        return web.json_response({"error": error}, status=f.status, headers=f.headers)

    async def models(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.requests.append(Recorded(request.method, request.path, auth, None))
        key = auth.removeprefix("Bearer ").strip()
        if key in self.deactivated_keys:
            return self._fail(Fail(401, "This key is associated with a deactivated account."))
        if self.valid_keys is not None and key not in self.valid_keys:
            return self._fail(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
        return web.json_response({"object": "list", "data": [{"id": "gpt-3.5-turbo", "object": "model"}]})


# --- Faults beyond an HTTP error status (tests/test_upstream_faults.py, tests/test_lifecycle.py) ---

def sse_chunk(text: str | None, answer_id: str = "chatcmpl-fake-1", finish: str | None = None) -> bytes:
    """One well-formed `chat.completion.chunk` event; `None` text sends the opening role delta."""
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if text is None else {"content": text}
    data = {"id": answer_id, "object": "chat.completion.chunk", "created": 1, "model": "gpt-3.5-turbo",
            "choices": [{"index": 0, "delta": delta if finish is None else {}, "finish_reason": finish}]}
    return f"data: {json.dumps(data)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class RawStream:
    """Answer 200 with `chunks` written byte for byte, `delay` seconds apart, then finish as `end` says:
    "eof" ends the body normally, "reset" drops the TCP connection mid-body, "hang" sends nothing more."""

    chunks: list[bytes] = field(default_factory=list)
    content_type: str = "text/event-stream"
    delay: float = 0.0
    end: str = "eof"


class FaultyOpenAI(FakeOpenAI):
    """The fake upstream plus `RawStream` behaviours (anything else is answered as FakeOpenAI does)."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers_running = 0  # chat handlers not yet finished, cancelled or failed

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.handlers_running += 1
        try:
            upcoming = self.script[0] if self.script else self.default
            if not isinstance(upcoming, RawStream):
                return await super().chat(request)
            body = await request.json()
            self.requests.append(Recorded(request.method, request.path, request.headers.get("Authorization"), body))
            behaviour = self.script.popleft() if self.script else self.default
            assert isinstance(behaviour, RawStream)
            return await self._raw(request, behaviour)
        finally:
            self.handlers_running -= 1

    async def _raw(self, request: web.Request, raw: RawStream) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": raw.content_type})
        await response.prepare(request)
        try:
            for chunk in raw.chunks:
                if raw.delay:
                    await asyncio.sleep(raw.delay)
                await response.write(chunk)
            if raw.end == "hang":
                await asyncio.sleep(3600)
            if raw.end == "reset":
                assert request.transport is not None
                request.transport.close()  # the body is cut mid-way: no chunked-encoding terminator
                return response  # aiohttp's own write_eof then meets the closed transport and gives up quietly
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            self.disconnected.set()
            raise
        await response.write_eof()
        return response
