"""Writing a streamed HTTP answer (`/v1`, `/chat`): how it ends when the answer fails, the client
leaves, or the server stops — the same for every streamed route."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, suppress

from aiohttp import web

from chatgpt.domain.errors import AnswerBlocked, Refused, ShuttingDown, UpstreamFailed
from chatgpt.keys import inflight_key, settings_key

log = logging.getLogger(__name__)

# A body piece and whether it is held: a held piece goes out with the next one, or with the end of the
# body. A door holds what likely ends its answer (the finish chunk, the end event), so that an answer
# whose end arrives with it leaves in one write, headers to end of body.
Piece = tuple[bytes, bool]


class StreamingAnswer(web.StreamResponse):
    """A StreamResponse whose headers wait for the first body bytes and leave in the same packet.

    aiohttp sends a StreamResponse's headers on their own at prepare(); our routes prepare only
    once the first piece of the answer is in hand, so the two can share one send. A short answer
    that arrived in one upstream read goes out as headers, body and end in one write.
    (`_send_headers_immediately` is the switch aiohttp's own `web.Response` turns off.)"""

    _send_headers_immediately = False


async def send_stream(request: web.Request, response: web.StreamResponse, body: AsyncGenerator[Piece, None],
                      error_event: Callable[[BaseException], bytes]) -> web.StreamResponse:
    """Write `body` to the prepared `response`, a piece per write (a door's piece holds everything one
    upstream read brought). A write to a client that reads slowly waits once aiohttp's buffer is full,
    so the upstream is read no faster than the client takes the answer. A failure once the headers are
    gone ends the body with `error_event(failure)`; so does a shutdown (SIGTERM); a client that left
    gets nothing more.

    After a write the next piece is asked for only `server.stream_interval_ms` later: what the upstream
    sent meanwhile waits in its buffer and comes out of one read as one piece, so an answer at 30 tokens
    a second costs one pass through the pipeline and one send() per ~1.5 tokens instead of per token
    (together about three fifths of the server's time per token). The first piece is never delayed."""
    config = request.config_dict  # a new proxy over the app chain at each access
    inflight = config[inflight_key]
    interval = config[settings_key].server.stream_interval_ms / 1000
    failure: BaseException | None = None
    held = b""
    inflight.enter()
    try:
        async with aclosing(body) as pieces:
            async for data, hold in pieces:
                if hold:
                    held += data
                    continue
                if held:
                    data, held = held + data, b""
                await response.write(data)
                if interval:
                    await asyncio.sleep(interval)
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
    with suppress(ConnectionResetError):  # the client may be gone by now: nothing to tell it
        # What was held before a failure goes out first.
        await response.write_eof(held + error_event(failure) if failure is not None else held)
    return response
