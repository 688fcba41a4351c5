"""Writing a streamed HTTP answer (`/v1`, `/chat`): how it ends when the answer fails, the client
leaves, or the server stops — the same for every streamed route."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress

from aiohttp import web

from chatgpt.domain.errors import AnswerBlocked, Refused, ShuttingDown, UpstreamFailed
from chatgpt.keys import inflight_key

log = logging.getLogger(__name__)

# A body piece and whether it is the last one: the last goes out with the end of the chunked body.
Piece = tuple[bytes, bool]


class StreamingAnswer(web.StreamResponse):
    """A StreamResponse whose headers wait for the first body bytes and leave in the same packet.

    aiohttp sends a StreamResponse's headers on their own at prepare(); our routes prepare only
    once the first piece of the answer is in hand, so the two can share one send. A short answer
    that arrived in one upstream read goes out as headers, body and end in one write.
    (`_send_headers_immediately` is the switch aiohttp's own `web.Response` turns off.)"""

    _send_headers_immediately = False


BACKLOG_BYTES = 256 * 1024  # body bytes waiting for a client that reads slowly; past this the answer waits


class _Coalescer:
    """Writes a body with as few socket writes as the answer allows. Pieces are queued; when the
    answer's own task next waits (for the upstream), the flush task writes all of them at once. An answer
    that arrived in one upstream read never waits: it leaves with the end of the body, in one write.
    So the events of one upstream read cost one write instead of one write (one send() call) each.
    The flush task lives as long as the answer and sleeps between reads: a paced answer (one event
    per upstream read) wakes it per event instead of creating a task per event."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._queued: list[bytes] = []
        self._size = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the flush task sleeps on it while nothing is queued
        self._drained: asyncio.Future[None] | None = None  # `wait()` sleeps on it
        self._kicked = False  # a callback will start the flush task once the answer's task waits
        self._ended = False

    def add(self, data: bytes) -> bool:
        """Queue `data`; True when the client is far behind (then `wait()` before adding more)."""
        self._queued.append(data)
        self._size += len(data)
        wake = self._wake
        if wake is not None:
            # The flush task runs only once this task yields to the loop: everything queued until then goes together.
            self._wake = None
            wake.set_result(None)
        elif self._task is None and not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kick)  # no task at all if the answer ends first
        return self._size > BACKLOG_BYTES

    def _kick(self) -> None:
        self._kicked = False
        if self._queued and self._task is None and not self._ended:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._queued:
                    data = b"".join(self._queued)
                    self._queued.clear()
                    self._size = 0
                    await self._response.write(data)
                self._tell_drained(None)
                if self._ended:
                    return
                self._wake = loop.create_future()
                await self._wake
        except BaseException as exc:
            self._tell_drained(exc)
            raise

    def _tell_drained(self, exc: BaseException | None) -> None:
        drained, self._drained = self._drained, None
        if drained is None or drained.done():
            return
        if exc is None:
            drained.set_result(None)
        elif isinstance(exc, asyncio.CancelledError):
            drained.cancel()
        else:
            drained.set_exception(exc)

    async def wait(self) -> None:
        """Wait until what is queued has been written (raises what the write met)."""
        task = self._task
        if task is None:
            task = self._task = asyncio.create_task(self._run())
        elif task.done():
            await task  # raises what the flush met (a client gone)
            return
        if not self._queued:
            return
        self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    async def finish(self, data: bytes) -> None:
        """Write what is queued and `data` with the end of the body."""
        self._ended = True
        queued, self._queued = self._queued, []
        task = self._task
        if task is not None:
            wake, self._wake = self._wake, None
            if wake is not None:
                wake.set_result(None)  # nothing more to write: it ends
            await task  # its write under way goes first; raises what the flush met (a client gone)
        await self._response.write_eof(b"".join([*queued, data]))

    async def stop(self) -> None:
        """The answer failed or the client left: end the flush task, whatever it was doing."""
        self._ended = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with suppress(BaseException):
                await task


async def send_stream(request: web.Request, response: web.StreamResponse, body: AsyncGenerator[Piece, None],
                      error_event: Callable[[BaseException], bytes]) -> web.StreamResponse:
    """Write `body` to the prepared `response`. A failure once the headers are gone ends the body
    with `error_event(failure)`; so does a shutdown (SIGTERM); a client that left gets nothing more."""
    inflight = request.config_dict[inflight_key]
    failure: BaseException | None = None
    writer = _Coalescer(response)
    inflight.enter()
    try:
        async with aclosing(body) as pieces:
            async for data, last in pieces:
                if last:
                    await writer.finish(data)
                elif writer.add(data):
                    await writer.wait()
    except (Refused, UpstreamFailed, AnswerBlocked) as error:
        failure = error
    except asyncio.CancelledError:
        if not inflight.stopping:
            raise  # the client left: nobody to tell
        failure = ShuttingDown()
    except ConnectionResetError:
        return response  # the client left while we wrote: the upstream is closed on the way out
    except Exception as error:
        log.exception("unexpected error while streaming %s %s", request.method, request.path)
        failure = error
    finally:
        inflight.leave()
        if failure is None:
            await writer.stop()
    with suppress(ConnectionResetError):  # the client may be gone by now: nothing to tell it
        if failure is not None:
            await writer.finish(error_event(failure))  # what was queued before the failure goes out first
        else:
            await response.write_eof(b"")  # a no-op once the last piece has ended the body
    return response
