"""`/websocket`: one reader loop, one writer and one question at a time per socket, cancel on close."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import aclosing, suppress
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.domain.answer import new_answer_id
from chatgpt.domain.errors import BadQuestion
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.domain.question import Question, clean_messages
from chatgpt.domain.wxlogin import WeChatLogin
from chatgpt.faces.envelope import error_text, known_error
from chatgpt.faces.frames import (
    FrameWriter,
    done_frame,
    error_frame,
    image_frame,
    pong_frame,
    quota_frame,
)
from chatgpt.faces.masking import ShownText
from chatgpt.faces.question_frames import check_types, cid_of, payer_of, prompt_of
from chatgpt.faces.sockets import close_within, transport_of
from chatgpt.keys import pipeline_key, settings_key, sockets_key, wechat_login_key
from chatgpt.server.guards import identity_of
from chatgpt.settings import Settings

log = logging.getLogger(__name__)

READ_STALL_SECONDS = 30.0  # a client that sends but reads nothing for this long is disconnected
MAX_PENDING = 4  # questions queued behind the one being answered; each may hold a 1 MiB frame
class SocketSession:
    """One client's socket: reads frames, answers questions one by one, writes through one writer."""

    # One per websocket: slots keep its attributes without a dict (an idle socket costs ~20 KB in all).
    __slots__ = (
        "_closing", "_current", "_worker", "identity", "login", "pending", "pipeline", "settings",
        "transport", "writer", "ws",
    )

    def __init__(self, ws: web.WebSocketResponse, transport: Callable[[], asyncio.Transport | None],
                 pipeline: ChatPipeline, settings: Settings, identity: str, login: WeChatLogin) -> None:
        self.ws = ws
        self.transport = transport
        self.pipeline = pipeline
        self.login = login
        self.settings = settings
        self.identity = identity
        self.writer = FrameWriter(ws, settings.ws.frame_interval_ms / 1000, stall_seconds=settings.ws.stall_seconds,
                                  buffered=self._buffered, on_stall=self._not_reading,
                                  bytes_per_second=settings.ws.bytes_per_second, burst_bytes=settings.ws.burst_bytes)
        self.pending: deque[dict[str, Any]] = deque()
        self._worker: asyncio.Task[None] | None = None  # exists only while questions wait
        self._current: dict[str, Any] | None = None  # the question being answered
        self._closing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve until the client leaves, idles out or stops reading; then cancel whatever is still
        being answered."""
        ws_settings = self.settings.ws
        try:
            while True:
                try:
                    message = await self.ws.receive(timeout=ws_settings.idle_seconds)
                except TimeoutError:  # not even a heartbeat for idle_seconds (the client pings every 30 s)
                    self.close_soon(WSCloseCode.OK, b"idle")
                    break
                if message.type == WSMsgType.TEXT:
                    self._receive(message.data)
                elif message.type == WSMsgType.BINARY:
                    self.writer.send(error_frame(None, texts.FRAME_NOT_JSON))
                else:  # closing, closed or broken
                    break
                if not await self.writer.wait_for_room(READ_STALL_SECONDS):
                    self._not_reading()
                    break
        finally:
            # The client is gone (or the server is stopping): stop paying for an answer nobody reads.
            self.pending.clear()
            await self._cancel_worker()
            await self.writer.close()
            if self._closing is not None:
                await asyncio.shield(self._closing)

    def close_soon(self, code: int, message: bytes) -> None:
        """Close the socket in the background, within ws.close_seconds whatever the client does."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(code, message))

    async def _close(self, code: int, message: bytes) -> None:
        await close_within(self.ws, self.transport, code, message, self.settings.ws.close_seconds)
        await self.writer.close()

    def _not_reading(self) -> None:
        self.close_soon(WSCloseCode.POLICY_VIOLATION, b"client not reading")

    def _buffered(self) -> int:
        transport = self.transport()
        return transport.get_write_buffer_size() if transport is not None else 0

    async def stop(self) -> None:
        """Server shutdown: every question in flight or waiting gets an error end frame, then 1001."""
        ending = ([] if self._current is None else [self._current]) + list(self.pending)
        self.pending.clear()
        await self._cancel_worker()
        for frame in ending:
            self.writer.send(error_frame(cid_of(frame), texts.SHUTTING_DOWN))
        # One close_seconds for both steps: a client that reads nothing must not hold the shutdown up.
        seconds = self.settings.ws.close_seconds
        started = time.monotonic()
        await self.writer.flush(seconds / 2)
        await close_within(self.ws, self.transport, WSCloseCode.GOING_AWAY, b"server shutdown",
                           max(seconds / 10, seconds - (time.monotonic() - started)))

    async def _cancel_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError):
                await self._worker

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
            self.writer.send(error_frame(cid_of(frame), texts.WS_TOO_FAST))
            return
        self.pending.append(frame)
        if self._worker is None:
            self._worker = asyncio.create_task(self._answer_in_turn())

    async def _answer_in_turn(self) -> None:
        try:
            while self.pending:
                frame = self._current = self.pending.popleft()
                try:
                    await self._answer(frame)
                except Exception as error:  # the table in faces/envelope.py says what the user reads
                    if known_error(error) is None:
                        log.exception("unexpected error answering a websocket question")
                    self.writer.send(error_frame(cid_of(frame), error_text(error)))
                self._current = None
        finally:
            self._worker = self._current = None

    async def _answer(self, frame: dict[str, Any]) -> None:
        cid = cid_of(frame)
        await self.pipeline.admit("ws", self.identity)
        check_types(frame)
        payer = payer_of(frame, self.settings)
        # A logged-in mini-program user (PROTOCOL.md E.5): counted under the WeChat user, not the address.
        # A bad token ends here, before anything is counted.
        token = frame.get("token")
        user = self.login.user_of(token) if token else None
        history = clean_messages(frame.get("messages") or [])
        prompt = prompt_of(frame, history)
        image = bool(frame.get("isGenImg"))
        if not image and not history and prompt:
            history = [{"role": "user", "content": prompt}]
        question = Question("ws", self.identity, payer, [] if image else history, frame.get("model"), user=user)
        if payer.kind == "anonymous" and prompt == texts.QUOTA_QUERY:
            self.writer.send(quota_frame(cid, await self.pipeline.remaining(question.account)))
            return
        if image:
            await self._draw(cid, question, prompt)
            return
        # The server's id, the same on every frame of this answer: upstreams repeat or omit theirs.
        # One id for the thinking frames and the answer's.
        answer_id = new_answer_id()
        thinking = self.settings.ws.reasoning == "live"
        size, thought, limit = 0, 0, self.settings.ws.max_answer_chars
        shown = False
        async with aclosing(self.pipeline.answer(question)) as deltas:
            # The answer and the reasoning as the client may see them: listed words masked in the text
            # and in its html; parts joined only when a frame goes out (FrameWriter).
            answer, reasoning = ShownText(deltas.words), ShownText(deltas.words)
            async for batch in deltas:
                grew = mused = too_long = False
                for delta in batch:
                    if delta.text:
                        size += len(delta.text)
                        if size > limit:
                            too_long = True
                            break
                        answer.feed(delta.text)
                        grew = True
                    elif delta.reasoning and thinking and not size:
                        thought += len(delta.reasoning)
                        if thought <= limit:  # past it the quote stops growing (each frame sends it whole)
                            reasoning.feed(delta.reasoning)
                            mused = True
                # One frame's worth per batch: the writer replaces a queued text with the newer one anyway.
                if grew:
                    self.writer.send_text(cid, answer_id, answer.parts, source=answer.source)
                elif mused and not size:
                    self.writer.send_text(cid, answer_id, reasoning.parts, thinking=True, source=reasoning.source)
                if too_long:
                    # Every frame carries the whole text: a runaway answer would cost the client (and us)
                    # quadratically. Leaving the loop closes the upstream request.
                    self.writer.send(error_frame(cid, texts.ANSWER_TOO_LONG))
                    return
                if not shown and (grew or mused):
                    shown = True
                    # The writer sends the first frame before this task goes on: an answer whose end came
                    # in the same read would otherwise hold its first frame through its bookkeeping.
                    await asyncio.sleep(0)
        self.writer.send(done_frame(cid))

    async def _draw(self, cid: Any, question: Question, prompt: str) -> None:
        if not prompt:
            raise BadQuestion(texts.PROMPT_EMPTY, "content")
        stored = await self.pipeline.draw(question, prompt)
        self.writer.send(image_frame(cid, stored.name.split(".")[0], stored.url))
        self.writer.send(done_frame(cid))


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    """Upgrade and serve one mini-program socket (no auth, no sub-protocol on the handshake)."""
    app = request.app
    settings = app[settings_key]
    sockets = app[sockets_key]
    identity = identity_of(request)
    if not sockets.admit(identity):
        # Refused before the handshake: a refused client costs no websocket, task or timer.
        log.info("websocket refused: %d open in all, %d from this address", len(sockets), sockets.count(identity))
        raise web.HTTPServiceUnavailable(text="Too many connections.", headers={"Retry-After": "60"})
    session: SocketSession | None = None
    try:
        # +1: aiohttp refuses a frame of exactly max_msg_size; the setting is the largest one accepted.
        ws = web.WebSocketResponse(max_msg_size=settings.ws.max_message_bytes + 1)
        try:
            await ws.prepare(request)
        except ConnectionError:  # the client left mid-handshake: nothing to answer, nothing to log
            return ws
        session = SocketSession(ws, transport_of(request), app[pipeline_key], settings, identity,
                                app[wechat_login_key])
        sockets.add(identity, session)
        await session.run()
    finally:
        sockets.release(identity, session)
    return ws


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: each question in flight ends with an error frame, then the socket closes with 1001."""
    if stopped := await app[sockets_key].stop_all():
        log.info("shutdown: closed %d websocket(s)", stopped)
