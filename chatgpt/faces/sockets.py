"""The open mini-program sockets: caps per address and in total, and a close that cannot hang."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from aiohttp import web

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """A socket's session, as the registry sees it at shutdown."""

    ws: web.WebSocketResponse

    async def stop(self) -> None:
        """End every question in flight with an error frame, then close with 1001."""
        ...


class SocketRegistry:
    """Every open socket's session, counted per client identity so that one address cannot hold
    the process's descriptors (PROTOCOL.md E.3). Iterating yields the websockets themselves."""

    def __init__(self, per_identity: int, total: int) -> None:
        self.per_identity = per_identity
        self.total = total
        self._sessions: dict[Stoppable, str] = {}
        self._counts: dict[str, int] = {}
        self._reserved = 0  # handshakes admitted but not yet registered

    def __len__(self) -> int:
        """Open sockets."""
        return len(self._sessions)

    def __iter__(self) -> Iterator[web.WebSocketResponse]:
        """The open websockets (a copy: closing one while iterating is fine)."""
        return iter([session.ws for session in self._sessions])

    def count(self, identity: str) -> int:
        """Sockets `identity` holds now (or is opening)."""
        return self._counts.get(identity, 0)

    def admit(self, identity: str) -> bool:
        """Reserve a place for one more socket of `identity`; False when over either cap.
        Called before the handshake, so a refused client never costs a websocket."""
        if self._reserved + len(self._sessions) >= self.total or self.count(identity) >= self.per_identity:
            return False
        self._counts[identity] = self.count(identity) + 1
        self._reserved += 1
        return True

    def add(self, identity: str, session: Stoppable) -> None:
        """The handshake of an admitted socket succeeded."""
        self._reserved -= 1
        self._sessions[session] = identity

    def release(self, identity: str, session: Stoppable | None) -> None:
        """A socket admitted for `identity` is gone (or its handshake failed: `session` is None)."""
        if session is None:
            self._reserved -= 1
        else:
            self._sessions.pop(session, None)
        left = self.count(identity) - 1
        if left > 0:
            self._counts[identity] = left
        else:
            self._counts.pop(identity, None)

    async def stop_all(self) -> int:
        """At shutdown: every session ends its questions with an error frame and closes with 1001."""
        sessions = list(self._sessions)
        results = await asyncio.gather(*(session.stop() for session in sessions), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("a websocket did not stop cleanly at shutdown: %r", result)
        return len(sessions)


async def close_within(ws: web.WebSocketResponse, transport: Callable[[], asyncio.Transport | None],
                       code: int, message: bytes, seconds: float) -> None:
    """Close `ws` with `code`, taking at most `seconds` even when the client reads nothing.

    aiohttp's close() writes the close frame and then waits for the send buffer to drain, and its
    transport.close() waits for the buffer too: a client that stopped reading would hold the socket
    (and its descriptor) for ever. Past the deadline the transport is aborted instead."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + seconds):
            await ws.close(code=code, message=message)
            # close() has closed the transport, which still flushes what it holds before it goes.
            while (current := transport()) is not None and current.get_write_buffer_size():
                await asyncio.sleep(min(0.05, seconds / 10))
    except (TimeoutError, ConnectionError):
        pass
    except asyncio.CancelledError:
        # aiohttp's drain waiter is shared by every writer of the socket: a writer cancelled while
        # waiting on it leaves it cancelled, and close() meets that. Only our own cancellation counts.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            _abort(transport())
            raise
    _abort(transport())


def _abort(transport: asyncio.Transport | None) -> None:
    """Drop a connection that still holds unsent bytes (a closed transport would wait for them)."""
    if transport is not None and transport.get_write_buffer_size():
        transport.abort()


def transport_of(request: web.Request) -> Callable[[], asyncio.Transport | None]:
    """The request's current transport (None once the connection is lost), read when needed."""
    def current() -> asyncio.Transport | None:
        transport = request.transport
        return transport if isinstance(transport, asyncio.Transport) else None
    return current
