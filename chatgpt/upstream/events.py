"""The one upstream stream reader: aiohttp-sse-client's EventSource, wrapped so that it is safe.

The library alone would, for an answer stream: re-POST the same body when the stream ends (a second
billed completion), wait without limit while the upstream sends only comments, and turn a refused
request into a bare ConnectionError (its error JSON lost). Here: one POST and never a reconnect (`max_connect_retry=0` and an `on_error` that
raises once the stream was open), the session's status middleware refuses a non-2xx answer before the
library sees it, every event is awaited under a deadline, and `[DONE]` ends the stream."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import TypeVar

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from aiohttp_sse_client.client import EventSource, MessageEvent  # type: ignore[import-untyped]

from chatgpt.domain import texts
from chatgpt.domain.errors import UpstreamBroken, UpstreamTimeout
from chatgpt.upstream.network import upstream_call
from chatgpt.upstream.session import raise_for_upstream_status

DONE = "[DONE]"
T = TypeVar("T")


async def event_payloads(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], *,
                         host: str, read_timeout: float, answer_timeout: float,
                         parse: Callable[[str], T]) -> AsyncIterator[T]:
    """POST `body` once and yield `parse(data)` of each event until `[DONE]` (parsed here: one
    generator fewer for every event to pass). Comments are not events: they do not restart
    `read_timeout`, the longest wait for the next event (the response headers included);
    `answer_timeout` caps the whole answer. Raises our upstream exceptions."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + answer_timeout
    response: aiohttp.ClientResponse | None = None
    opened = False

    async def keep(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        # Holds the accepted response: the deadlines end a wait through its body's reader. (Its
        # connection goes back to the pool by itself when the body ended with [DONE].)
        nonlocal response
        response = await handler(request)
        return response

    def on_open() -> None:
        nonlocal opened
        opened = True

    def on_error() -> None:
        # Called when the stream ends (the library would then POST the same body again) and when
        # connecting fails (the library re-raises that failure after this returns).
        if opened:
            raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="the stream ended before [DONE]"))

    def timed_out(when: float) -> UpstreamTimeout:
        if when >= deadline:
            return UpstreamTimeout(texts.EN_ANSWER_TIMEOUT.format(host=host, seconds=answer_timeout))
        return UpstreamTimeout(texts.EN_READ_TIMEOUT.format(host=host, seconds=read_timeout))

    # The per-request middlewares replace the session's, so its status check is listed again.
    # reconnection_time=0: were a reconnect ever to slip through, the tests would see the second POST
    # at once instead of after the library's 10 s.
    source = _ChunkedEventSource(url, option={"method": "POST"}, max_connect_retry=0, reconnection_time=timedelta(0),
                         session=session, on_open=on_open, on_error=on_error, data=body, headers=headers,
                         middlewares=(keep, raise_for_upstream_status))
    with upstream_call(host, lambda: opened):
        async with AsyncExitStack() as stack:
            connecting = asyncio.timeout_at(min(loop.time() + read_timeout, deadline))
            try:
                async with connecting:
                    await stack.enter_async_context(source)
            except TimeoutError:
                if not connecting.expired():
                    raise  # aiohttp's own connect timeout: an unreachable upstream
                raise timed_out(connecting.when() or deadline) from None
            if response is None:  # cannot happen: the library opened the stream through `keep`
                raise UpstreamBroken(texts.EN_BROKEN.format(host=host, cause="no response to read"))
            watchdog = _Watchdog(loop, response.content, read_timeout, deadline, timed_out)
            stack.callback(watchdog.stop)
            source.read_from(response.content, on_error)
            next_event = source.__anext__
            while True:
                watchdog.waiting_since = now = loop.time()
                if now >= deadline:
                    raise timed_out(deadline)
                event = await next_event()
                watchdog.waiting_since = None
                data = event.data
                if data == DONE:
                    return
                yield parse(data)


class _ChunkedEventSource(EventSource):  # type: ignore[misc]
    """The library's EventSource reading its stream a network read at a time instead of a line at a
    time: its own `__anext__` awaits `StreamReader.readline` twice per event (the data line and the
    blank line), about 6 µs, where one `readany` per network read serves every event in it. Each line
    then goes through the library's own steps unchanged (the same decoding, comment rule, field
    parsing and dispatch, `_process_field` and `_dispatch_event`), and a line longer than aiohttp's
    `readline` would take raises the same `LineTooLong`."""

    def read_from(self, content: aiohttp.StreamReader, ended: Callable[[], None]) -> None:
        """Read events from `content` (the response's body the library opened); `ended()` is told when
        the body ends, as the library tells its `on_error` (ours raises: no reconnect)."""
        self._content = content
        self._ended = ended
        self._max_line = content.get_read_buffer_limits()[1]  # what `readline` allows: the high water
        self._lines: deque[bytes] = deque()
        self._partial = b""

    async def __anext__(self) -> MessageEvent:
        lines = self._lines
        while True:
            while lines:
                # The library's per-line steps, as in its `__anext__`.
                line = lines.popleft().decode("utf8").rstrip("\r")
                if line == "":
                    event = self._dispatch_event()
                    if event is not None:
                        return event
                    continue
                if line[0] == ":":
                    continue
                if ":" in line:
                    name, value = line.split(":", 1)
                    self._process_field(name, value.lstrip(" "))
                else:
                    self._process_field(line, "")
            chunk = await self._content.readany()
            if not chunk:  # the end of the body: a last line without its newline still counts, as in readline
                if self._partial:
                    lines.append(self._partial)
                    self._partial = b""
                    continue
                self._ended()
                raise StopAsyncIteration
            if self._partial:
                chunk = self._partial + chunk
            parts = chunk.split(b"\n")
            self._partial = parts.pop()
            if len(chunk) > self._max_line and (len(self._partial) > self._max_line or any(
                    len(part) >= self._max_line for part in parts)):
                raise LineTooLong(chunk[:100] + b"...", self._max_line)
            lines.extend(parts)


class _Watchdog:
    """The deadline of each wait for an event, at the cost of two assignments per event: one timer
    per stream, re-armed only when it fires (an `asyncio.timeout` per event costs a timer handle, a
    heap push and a cancel, several microseconds each time). A wait that outlives `read_timeout` (or
    the answer's deadline) ends with `UpstreamTimeout` raised from the stream's read, the way aiohttp's
    own `sock_read` ends one. Time spent by our own side between events does not count."""

    def __init__(self, loop: asyncio.AbstractEventLoop, content: aiohttp.StreamReader, read_timeout: float,
                 deadline: float, timed_out: Callable[[float], UpstreamTimeout]) -> None:
        self.waiting_since: float | None = None  # loop time the current wait for an event began
        self._loop = loop
        self._content = content
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._timed_out = timed_out
        self._handle = loop.call_at(min(loop.time() + read_timeout, deadline), self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is None:  # not waiting: our side is busy; the loop checks the deadline itself
            self._handle = self._loop.call_at(now + self._read_timeout, self._check)
            return
        due = min(since + self._read_timeout, self._deadline)
        if now >= due:
            self._content.set_exception(self._timed_out(due))
        else:
            self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        """The stream is over."""
        self._handle.cancel()
