"""The one upstream stream reader: aiohttp-sse-client's EventSource, wrapped so that it is safe.

The library alone would, for an answer stream: re-POST the same body when the stream ends (a second
billed completion), wait without limit while the upstream sends only comments, and turn a refused
request into a bare ConnectionError (its error JSON lost). Here: one POST and never a reconnect (`max_connect_retry=0` and an `on_error` that
raises once the stream was open), the session's status middleware refuses a non-2xx answer before the
library sees it, every event is awaited under a deadline, and `[DONE]` ends the stream."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
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
                         parse: Callable[[str], T]) -> AsyncIterator[list[T]]:
    """POST `body` once and yield, for each network read that completes events, `parse(data)` of each
    of them, until `[DONE]`. A batch per read, not an item per event: an answer that arrives in one read
    crosses every layer above once, not once per event. Comments are not events: they do not restart
    `read_timeout`, the longest wait for the next event (the response headers included);
    `answer_timeout` caps the whole answer. Raises our upstream exceptions (an event `parse` refuses
    after the good ones of its read have been yielded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + answer_timeout
    opened = False

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

    # The status check is listed per request, so that it holds on any session the caller passes.
    # reconnection_time=0: were a reconnect ever to slip through, the tests would see the second POST
    # at once instead of after the library's 10 s.
    source = _ChunkedEventSource(url, option={"method": "POST"}, max_connect_retry=0, reconnection_time=timedelta(0),
                                 session=session, on_open=on_open, on_error=on_error, data=body, headers=headers,
                                 middlewares=(raise_for_upstream_status,))
    with upstream_call(host, lambda: opened):
        connecting = asyncio.timeout_at(min(loop.time() + read_timeout, deadline))
        try:
            async with connecting:
                await source.__aenter__()
        except TimeoutError:
            if not connecting.expired():
                raise  # aiohttp's own connect timeout: an unreachable upstream
            raise timed_out(connecting.when() or deadline) from None
        try:
            content = source.opened_body()
            watchdog = _Watchdog(loop, content, read_timeout, deadline, timed_out)
            try:
                source.read_from(content, on_error)
                while True:
                    watchdog.waiting_since = now = loop.time()
                    if now >= deadline:
                        raise timed_out(deadline)
                    events = await source.next_events()
                    watchdog.waiting_since = None
                    batch: list[T] = []
                    refused: Exception | None = None
                    for event in events:
                        data = event.data
                        if data == DONE:
                            if batch:
                                yield batch
                            return
                        try:
                            batch.append(parse(data))
                        except Exception as exc:  # the events before it in this read still count
                            refused = exc
                            break
                    if batch:
                        yield batch
                    if refused is not None:
                        raise refused
            finally:
                watchdog.stop()
        finally:
            await source.__aexit__(None, None, None)


class _ChunkedEventSource(EventSource):  # type: ignore[misc]
    """The library's EventSource reading its stream a network read at a time instead of a line at a
    time: its own `__anext__` awaits `StreamReader.readline` twice per event (the data line and the
    blank line), about 6 µs, and returns one event per call, where one `readany` per network read
    serves every event in it. Each line then goes through the library's own steps unchanged (the same
    decoding, comment rule, field parsing and dispatch, `_process_field` and `_dispatch_event`), and a
    line longer than aiohttp's `readline` would take raises the same `LineTooLong`."""

    def opened_body(self) -> aiohttp.StreamReader:
        """The body of the response the library opened (it keeps the response once connected)."""
        response: aiohttp.ClientResponse | None = self._response
        if response is None:  # cannot happen: `__aenter__` returned, so the library holds its response
            raise UpstreamBroken("The upstream stream was not opened.")
        return response.content

    def read_from(self, content: aiohttp.StreamReader, ended: Callable[[], None]) -> None:
        """Read events from `content` (the response's body the library opened); `ended()` is told when
        the body ends, as the library tells its `on_error` (ours raises: no reconnect)."""
        self._content = content
        self._ended = ended
        self._max_line = content.get_read_buffer_limits()[1]  # what `readline` allows: the high water
        self._lines: list[str] = []
        self._partial = b""

    async def next_events(self) -> list[MessageEvent]:
        """The events the next network read(s) complete: at least one, in order."""
        events: list[MessageEvent] = []
        while True:
            for line in self._lines:
                # The library's per-line steps, as in its `__anext__`.
                line = line.rstrip("\r")
                if line == "":
                    event = self._dispatch_event()
                    if event is not None:
                        events.append(event)
                elif line[0] == ":":
                    continue
                elif ":" in line:
                    name, value = line.split(":", 1)
                    self._process_field(name, value.lstrip(" "))
                else:
                    self._process_field(line, "")
            self._lines.clear()
            if events:
                return events
            chunk = await self._content.readany()
            if not chunk:  # the end of the body: a last line without its newline still counts, as in readline
                if self._partial:
                    self._lines.append(self._partial.decode("utf8"))
                    self._partial = b""
                    continue
                self._ended()
                raise StopAsyncIteration
            if self._partial:
                chunk = self._partial + chunk
            end = chunk.rfind(b"\n") + 1
            self._partial = chunk[end:]
            if len(chunk) > self._max_line and self._too_long(chunk, end):
                raise LineTooLong(chunk[:100] + b"...", self._max_line)
            # Decoded once per read: the complete lines end at a newline, which no UTF-8 sequence contains.
            self._lines = chunk[:end].decode("utf8").split("\n")
            self._lines.pop()  # after the last newline: the partial line, kept as bytes

    def _too_long(self, chunk: bytes, end: int) -> bool:
        if len(self._partial) > self._max_line:
            return True
        start = 0
        while start < end:
            stop = chunk.index(b"\n", start)
            if stop - start >= self._max_line:
                return True
            start = stop + 1
        return False


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
