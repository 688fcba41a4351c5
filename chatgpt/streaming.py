"""Writing a streamed HTTP answer (`/v1`, `/chat`): how it ends when the answer fails, the client
leaves, or the server stops — the same for every streamed route."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress

from aiohttp import web

from .appkeys import inflight_key
from .errors import ServiceError, shutting_down


async def send_stream(request: web.Request, response: web.StreamResponse, body: AsyncIterator[bytes],
                      error_event: Callable[[ServiceError], bytes]) -> web.StreamResponse:
    """Write `body` to the prepared `response`. A failure once the headers are gone ends the body
    with `error_event(failure)`; so does a shutdown (SIGTERM); a client that left gets nothing more."""
    inflight = request.app[inflight_key]
    failure: ServiceError | None = None
    inflight.enter()
    try:
        async with aclosing(body) as pieces:
            async for data in pieces:
                await response.write(data)
    except ServiceError as error:
        failure = error
    except asyncio.CancelledError:
        if not inflight.stopping:
            raise  # the client left: nobody to tell
        failure = shutting_down()
    except ConnectionResetError:
        return response  # the client left while we wrote: the upstream is closed on the way out
    finally:
        inflight.leave()
    with suppress(ConnectionResetError):  # the client may be gone by now: nothing to tell it
        if failure is not None:
            await response.write(error_event(failure))
        await response.write_eof()
    return response
