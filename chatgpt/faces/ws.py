"""`/websocket`: one reader loop, one writer and one question at a time per socket, cancel on close."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import aclosing, suppress
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.keys import pipeline_key, settings_key, sockets_key
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.domain.errors import ServiceError, bad_request
from chatgpt.faces.frames import (
    FrameWriter,
    done_frame,
    error_frame,
    image_frame,
    pong_frame,
    quota_frame,
)
from chatgpt.server.guards import identity_of
from chatgpt.domain.question import Payer, Question, clean_messages
from chatgpt.settings import Settings

log = logging.getLogger(__name__)

READ_STALL_SECONDS = 30.0  # a client that sends but reads nothing for this long is disconnected
MAX_PENDING = 4  # questions queued behind the one being answered; each may hold a 1 MiB frame
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "parentId": (str, int, float), "authType": (str,), "authValue": (str,),
    "isDemo": (bool,), "content": (str,), "messages": (list,), "isGenImg": (bool,),
    "isSender": (bool,), "model": (str,), "conversationId": (str, int, float, bool),
}


def check_types(frame: dict[str, Any]) -> None:
    """Every known field must have its contract type (null counts as absent)."""
    for name, kinds in _TYPES.items():
        value = frame.get(name)
        if value is not None and not isinstance(value, kinds):
            raise bad_request(texts.FRAME_BAD_FIELD.format(field=name))


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
        raise ServiceError("400001", texts.TOKEN_MODE_GONE, http_status=401)
    payer = Payer.from_bearer(frame.get("authValue"), settings.api.client_tokens)
    if payer.kind == "anonymous":
        raise bad_request(texts.API_KEY_BLANK)
    return payer


class SocketSession:
    """One client's socket: reads frames, answers questions one by one, writes through one writer."""

    def __init__(self, ws: web.WebSocketResponse, pipeline: ChatPipeline, settings: Settings, identity: str) -> None:
        self.ws = ws
        self.pipeline = pipeline
        self.settings = settings
        self.identity = identity
        self.writer = FrameWriter(ws, settings.ws.frame_interval_ms / 1000)
        self.pending: deque[dict[str, Any]] = deque()
        self._worker: asyncio.Task[None] | None = None  # exists only while questions wait

    async def run(self) -> None:
        """Serve until the client leaves; then cancel whatever is still being answered."""
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    self._receive(message.data)
                elif message.type == WSMsgType.BINARY:
                    self.writer.send(error_frame(None, texts.FRAME_NOT_JSON))
                if not await self.writer.wait_for_room(READ_STALL_SECONDS):
                    await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"client not reading")
                    break
        finally:
            # The client is gone (or the server is stopping): stop paying for an answer nobody reads.
            self.pending.clear()
            if self._worker is not None:
                self._worker.cancel()
                with suppress(asyncio.CancelledError):
                    await self._worker
            await self.writer.close()

    def _receive(self, data: str) -> None:
        try:
            frame = jsontext.parse(data)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            self.writer.send(error_frame(None, texts.FRAME_NOT_JSON))
            return
        if frame.get("heart") == "ping":
            self.writer.send(pong_frame())  # never limited, never queued behind an answer
            return
        if len(self.pending) >= MAX_PENDING:
            self.writer.send(error_frame(_cid(frame), texts.WS_TOO_FAST))
            return
        self.pending.append(frame)
        if self._worker is None:
            self._worker = asyncio.create_task(self._answer_in_turn())

    async def _answer_in_turn(self) -> None:
        try:
            while self.pending:
                frame = self.pending.popleft()
                try:
                    await self._answer(frame)
                except ServiceError as error:
                    self.writer.send(error_frame(_cid(frame), error.message))
                except Exception:
                    log.exception("unexpected error answering a websocket question")
                    self.writer.send(error_frame(_cid(frame), texts.SERVICE_ERROR))
        finally:
            self._worker = None

    async def _answer(self, frame: dict[str, Any]) -> None:
        cid = _cid(frame)
        await self.pipeline.admit("ws", self.identity)
        check_types(frame)
        payer = payer_of(frame, self.settings)
        history = clean_messages(frame.get("messages") or [])
        prompt = prompt_of(frame, history)
        if payer.kind == "anonymous" and prompt == texts.QUOTA_QUERY:
            self.writer.send(quota_frame(cid, self.pipeline.remaining(self.identity)))
            return
        if frame.get("isGenImg"):
            await self._draw(cid, payer, prompt)
            return
        if not history and prompt:
            history = [{"role": "user", "content": prompt}]
        question = Question("ws", self.identity, payer, history,
                            self.pipeline.choose_model(frame.get("model"), strict=False))
        answer: list[str] = []
        thinking: list[str] | None = [] if self.settings.ws.reasoning == "live" else None
        answer_id = ""  # one id for the thinking frames and the answer's
        async with aclosing(self.pipeline.answer(question)) as deltas:
            async for delta in deltas:
                answer_id = answer_id or delta.answer_id
                if delta.text:
                    answer.append(delta.text)
                    self.writer.send_text(cid, answer_id, answer)
                elif delta.reasoning and thinking is not None and not answer:
                    thinking.append(delta.reasoning)
                    self.writer.send_text(cid, answer_id, thinking, thinking=True)
        self.writer.send(done_frame(cid))


    async def _draw(self, cid: Any, payer: Payer, prompt: str) -> None:
        if not prompt:
            raise bad_request(texts.PROMPT_EMPTY)
        question = Question("ws", self.identity, payer, [], self.settings.upstream.model)
        stored = await self.pipeline.image(question, prompt)
        self.writer.send(image_frame(cid, stored.name.split(".")[0], stored.url))
        self.writer.send(done_frame(cid))


def _cid(frame: dict[str, Any]) -> Any:
    """The conversationId to echo: exactly as sent when it is a JSON scalar, else left out."""
    cid = frame.get("conversationId")
    return cid if isinstance(cid, (str, int, float, bool)) else None


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """Upgrade and serve one mini-program socket (no auth, no sub-protocol on the handshake)."""
    app = request.app
    settings = app[settings_key]
    # +1: aiohttp refuses a frame of exactly max_msg_size; the setting is the largest one accepted.
    ws = web.WebSocketResponse(max_msg_size=settings.ws.max_message_bytes + 1)
    await ws.prepare(request)
    identity = identity_of(request)
    app[sockets_key].add(ws)
    try:
        await SocketSession(ws, app[pipeline_key], settings, identity).run()
    finally:
        app[sockets_key].discard(ws)
    return ws


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: tell every client the server is going away (1001) instead of dropping it."""
    for ws in list(app[sockets_key]):
        with suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
