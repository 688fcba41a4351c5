"""Websocket frames of PROTOCOL.md A.3 and the one writer per socket that sends them in order."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import suppress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from chatgpt import jsontext
from chatgpt.domain import texts
from chatgpt.faces.markdown import IncrementalRenderer, to_html
from chatgpt.faces.masking import unhide
from chatgpt.faces.pacing import TextPace

log = logging.getLogger(__name__)

MAX_QUEUED = 256  # frames waiting for a client that does not read; past this the socket is closed
LOW_WATER = 32  # the reader stops taking frames from a client while more than this wait to go out
# After an answer's text frame the writer waits this long for the next frame before its task ends: an
# answer's frames then share one task instead of costing a new one each (a frame every 50 ms).
LINGER_SECONDS = 1.0
# A timer may fire up to a millisecond early (uvloop counts milliseconds): a wait shorter than this is
# not worth another timer.
EARLY = 0.001


_clock: tuple[int, str] = (0, "")  # the last second formatted: frames go out many times a second


def now_text() -> str:
    """`createTime` as the client shows it: server local time."""
    global _clock
    second = int(time.time())
    if _clock[0] != second:
        _clock = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
    return _clock[1]


def _frame(cid: Any, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {} if cid is None else {"conversationId": cid}
    frame.update((k, v) for k, v in fields.items() if v is not None)
    return frame


def text_frame(cid: Any, answer_id: str, content: str, html: str | None = None) -> dict[str, Any]:
    """The whole answer so far (cumulative) with its Markdown rendered. Built directly, not by `_frame`:
    one goes out per 50 ms of every answer, and none of its fields can be None."""
    frame: dict[str, Any] = {} if cid is None else {"conversationId": cid}
    frame.update(id=answer_id, role="assistant", content=content, html=to_html(content) if html is None else html,
                 createTime=now_text(), isDone=False, isSuccess=True)
    return frame


def thinking_quote(reasoning: str) -> str:
    """What a bubble shows while only reasoning has arrived: a Markdown quote, the line `> 思考中…`
    then the reasoning so far, every line prefixed `> `."""
    return f"> {texts.THINKING}\n> " + reasoning.replace("\n", "\n> ")


def done_frame(cid: Any) -> dict[str, Any]:
    """Exactly one per question, after all of its text."""
    return _frame(cid, role="assistant", content="DONE", html="DONE", createTime=now_text(),
                  isDone=True, isSuccess=True)


def error_frame(cid: Any, message: str) -> dict[str, Any]:
    """Ends a question with a refusal or failure; `content` is never empty."""
    message = message or "error"
    return _frame(cid, role="assistant", content=message, html=to_html(message), createTime=now_text(),
                  isDone=True, isSuccess=False)


def image_frame(cid: Any, answer_id: str, url: str) -> dict[str, Any]:
    """A saved picture, followed by the end frame."""
    return _frame(cid, id=answer_id, role="assistant", content="[图片]", html="[图片]", url=url, isImg=True,
                  createTime=now_text(), isDone=False, isSuccess=True)


def quota_frame(cid: Any, remaining: int) -> dict[str, Any]:
    """The answer to `查询次数`: the number of questions left today."""
    return _frame(cid, content=str(remaining), html=str(remaining), createTime=now_text(),
                  isDone=True, isSuccess=False)


def pong_frame() -> dict[str, Any]:
    """The heartbeat answer."""
    return {"heart": "pong", "time": int(time.time() * 1000)}


def _settle(future: asyncio.Future[None]) -> None:
    """Timer callback: end a wait that nothing else ended."""
    if not future.done():
        future.set_result(None)


@dataclass
class _PendingText:
    cid: Any
    answer_id: str
    parts: list[str]  # the answer (or the reasoning) so far: joined only when a frame is sent
    thinking: bool = False
    source: list[str] | None = None  # the Markdown its html is rendered from, when not `parts` (masked words)


class FrameWriter:
    """The only task that writes to one socket. Text frames of an answer are coalesced: a newer
    cumulative text replaces a queued one, and the next goes out when the answer's pace allows
    (faces/pacing.py: the interval, then a byte budget per answer; the first frame at once, the last
    text never held for the budget). HTML is rendered only for frames actually sent. The task exists
    only while frames wait or an answer is being sent (LINGER_SECONDS), so an idle socket costs no task.

    While frames wait, a watchdog checks the socket's send buffer: when bytes sit there without
    shrinking for `stall_seconds`, the client has stopped reading; the writer stops and calls
    `on_stall` (which closes the socket), instead of waiting on the full buffer for ever."""

    # One per websocket: slots keep its attributes without a dict (an idle socket costs ~20 KB in all).
    __slots__ = (
        "_answering", "_behind", "_buffered", "_eager", "_joined", "_last_answer", "_last_progress", "_last_size",
        "_more", "_on_stall", "_pace", "_queue", "_renderer", "_room", "_stall_seconds", "_task", "_thinking",
        "_watchdog", "_ws", "stalled",
    )

    def __init__(self, ws: web.WebSocketResponse, interval: float, *, stall_seconds: float = 25.0,
                 buffered: Callable[[], int] = lambda: 0, on_stall: Callable[[], None] = lambda: None,
                 bytes_per_second: float = 0.0, burst_bytes: float = 0.0) -> None:
        self._ws = ws
        self._pace = TextPace(interval, bytes_per_second, burst_bytes)
        self._behind: asyncio.Future[None] | None = None  # set when a frame is queued behind a waiting text
        self._queue: deque[dict[str, Any] | _PendingText] = deque()
        self._task: asyncio.Task[None] | None = None
        self._answering = False  # the last frame sent was an answer's text: more of it is coming
        self._more: asyncio.Future[None] | None = None  # set when a frame is queued while the task lingers
        self._eager = True  # False while the interval runs: only a frame that may go at once sets `_more`
        self._joined: tuple[list[str], int, str] | None = None  # parts, how many are joined, their text
        self._room: asyncio.Event | None = None  # set when the queue is back under LOW_WATER
        self._last_answer: str | None = None
        # Of the answer being sent (made with its first frame: an idle socket keeps none) and of its
        # reasoning, inside the quote (made when the answer shows some).
        self._renderer: IncrementalRenderer | None = None
        self._thinking: IncrementalRenderer | None = None
        self._stall_seconds = stall_seconds
        self._buffered = buffered  # bytes the transport holds that the client has not taken yet
        self._on_stall = on_stall
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_size = 0
        self._last_progress = 0.0
        self.stalled = False

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame to be sent after everything queued before it."""
        self._push(frame)

    def send_text(self, cid: Any, answer_id: str, parts: list[str], thinking: bool = False,
                  source: list[str] | None = None) -> None:
        """Queue the cumulative text of an answer (`parts`, still growing: it is joined when the frame
        goes out), replacing its queued older text if any. `thinking`: the parts are reasoning, shown
        as a quote (`thinking_quote`) until the answer's own text replaces it. `source`: the Markdown
        the html is rendered from when it is not the text itself (masked words, faces/masking.py)."""
        tail = self._queue[-1] if self._queue else None
        if isinstance(tail, _PendingText) and tail.answer_id == answer_id:
            tail.parts, tail.thinking, tail.source = parts, thinking, source
            return
        self._push(_PendingText(cid, answer_id, parts, thinking, source))

    def _text_of(self, parts: list[str]) -> str:
        """`"".join(parts)` for the parts of a growing text: only the parts added since the last frame are
        joined again. Parts only grow at the end, except the last, which masking may replace, so the
        joined prefix never includes it (a frame of a long answer then costs a copy of its text, not a
        join of every token in it)."""
        cached = self._joined
        start, prefix = (cached[1], cached[2]) if cached is not None and cached[0] is parts and \
            len(parts) > cached[1] else (0, "")
        stable = len(parts) - 1
        if stable > start:
            prefix += "".join(parts[start:stable])
            start = stable
        self._joined = (parts, start, prefix)
        return prefix + parts[-1] if parts else prefix

    def _push(self, item: dict[str, Any] | _PendingText) -> None:
        if self.stalled:
            return
        if len(self._queue) >= MAX_QUEUED:
            # The client is not reading: stop feeding it rather than grow without bound.
            self._stall("%d frames waiting", len(self._queue))
            return
        self._queue.append(item)
        if self._behind is not None and not self._behind.done():
            self._behind.set_result(None)  # the waiting text is now the last of its run: it goes sooner
        more = self._more
        if more is not None and not more.done() and (
                self._eager or not isinstance(item, _PendingText) or item.answer_id != self._last_answer):
            more.set_result(None)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
            if self._watchdog is None:
                self._last_size, self._last_progress = 0, time.monotonic()
                self._arm()

    def _arm(self) -> None:
        period = max(0.01, self._stall_seconds / 10)
        self._watchdog = asyncio.get_running_loop().call_later(period, self._watch)

    def _watch(self) -> None:
        """Timer, while frames wait: a send buffer that holds bytes and has not shrunk for
        stall_seconds means the client reads nothing."""
        self._watchdog = None
        if self._task is None or self.stalled:
            return  # nothing waits: the watchdog sleeps until the next frame
        now, size = time.monotonic(), self._buffered()
        if size == 0 or size < self._last_size:
            self._last_progress = now
        self._last_size = size
        if now - self._last_progress >= self._stall_seconds:
            self._stall("%d bytes unread for %.0f s", size, now - self._last_progress)
            return
        self._arm()

    def _stall(self, why: str, *args: object) -> None:
        """Give up on a client that does not read: nothing more is queued, the socket is closed."""
        self.stalled = True
        self._queue.clear()
        log.info("websocket client not reading (" + why + "): closing it", *args)
        self._on_stall()

    async def _wait_interval(self, item: _PendingText) -> None:
        if item.answer_id != self._last_answer:
            return  # the first text frame of an answer is never delayed
        loop = asyncio.get_running_loop()
        delay = self._pace.interval_wait(loop.time())
        if delay > EARLY:
            await asyncio.sleep(delay)
        # Nothing queued behind the text: the answer goes on, so the byte budget applies. A frame
        # queued meanwhile (the end frame) makes it the answer's last text, which goes at once.
        while len(self._queue) == 1 and (delay := self._pace.budget_wait(loop.time())) > 0:
            self._behind = loop.create_future()
            try:
                await asyncio.wait((self._behind,), timeout=delay)
            finally:
                self._behind = None

    async def wait_for_room(self, timeout: float) -> bool:
        """Wait until at most LOW_WATER frames wait; False if the client read nothing for `timeout`.
        The reader calls this, so a client that sends fast but reads is slowed, not cut off."""
        if len(self._queue) <= LOW_WATER:
            return True
        if self._room is None:
            self._room = asyncio.Event()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that races
            # with the wait ending, and the socket's reader would then outlive its close.
            async with asyncio.timeout(timeout):
                await self._room.wait()
        except TimeoutError:
            return False
        return True

    def _made_room(self) -> None:
        if self._room is not None and len(self._queue) <= LOW_WATER:
            self._room.set()
            self._room = None

    async def close(self) -> None:
        """Stop sending (the client left or the socket is closing)."""
        self._queue.clear()
        self._made_room()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until every queued frame has been sent; True if it was."""
        task = self._task
        if task is None:
            return True
        done, _ = await asyncio.wait((task,), timeout=timeout)
        return bool(done)

    async def _drain(self) -> None:
        """Send queued frames in order until none is left, then end."""
        try:
            while not self._ws.closed:
                if not self._queue and not (self._answering and await self._next_frame_soon()):
                    break
                await self._send_head()
        except ConnectionError:
            self._queue.clear()  # the client is gone; the reader loop ends and cleans up
        finally:
            self._task = None
            # An idle socket keeps no answer's text, nor its HTML (an answer that goes on after a pause
            # longer than LINGER_SECONDS is rendered afresh, once).
            self._joined = self._renderer = self._thinking = None
            self._made_room()

    async def _next_frame_soon(self) -> bool:
        """After an answer's text frame, wait for the next frame; True if one was queued. Until the
        interval allows the answer's next text, only a frame that may go at once (an end frame, another
        answer's text) wakes the writer: the answer's own newer text waits in the queue anyway, so the
        writer wakes once per frame, not once when the text is queued and again when the interval ends.
        Past the interval, any frame wakes it, for up to LINGER_SECONDS."""
        delay = self._pace.interval_wait(asyncio.get_running_loop().time())
        if delay > EARLY:
            await self._wait_for_frame(delay, eager=False)
            if self._queue:
                return True
        await self._wait_for_frame(LINGER_SECONDS, eager=True)
        return bool(self._queue)

    async def _wait_for_frame(self, timeout: float, eager: bool) -> None:
        loop = asyncio.get_running_loop()
        more = self._more = loop.create_future()
        self._eager = eager
        timer = loop.call_later(timeout, _settle, more)  # cheaper than asyncio.wait's own waiter
        try:
            await more
        finally:
            timer.cancel()
            self._more = None

    async def _send_head(self) -> None:
        head = self._queue[0]
        if isinstance(head, _PendingText):
            await self._wait_interval(head)  # head stays queued, so newer text can still replace it
            if not self._queue or self._queue[0] is not head:
                return  # the queue was cleared while the text waited (the client stopped reading)
            if head.answer_id != self._last_answer:
                self._renderer = self._thinking = None
            text = self._text_of(head.parts)
            source = text if head.source is None else "".join(head.source)
            if head.thinking:
                # The quote's HTML is a blockquote around the rendering of its unquoted lines (the
                # same HTML, CommonMark defines a quote's content that way), so the reasoning renders
                # incrementally instead of whole for every frame.
                thinking = self._thinking = self._thinking or IncrementalRenderer()
                html = "<blockquote>\n" + thinking.render(f"{texts.THINKING}\n{source}") + "</blockquote>\n"
                content = thinking_quote(text)
            else:
                renderer = self._renderer = self._renderer or IncrementalRenderer()
                html, content = renderer.render(source), text
            frame = text_frame(head.cid, head.answer_id, content, html if head.source is None else unhide(html))
        else:
            frame = head
        self._queue.popleft()
        self._made_room()
        # Always valid UTF-8 (a lone surrogate echoed from the client goes out escaped).
        data = jsontext.dumpb(frame)
        self._answering = isinstance(head, _PendingText)
        if isinstance(head, _PendingText):
            self._pace.sent(asyncio.get_running_loop().time(), len(data), head.answer_id != self._last_answer)
            self._last_answer = head.answer_id
        await self._ws.send_frame(data, WSMsgType.TEXT)
