"""The app's one upstream ClientSession and its status middleware: a refused request never reaches
the code that reads answers, and its error JSON stays readable."""
from __future__ import annotations

import aiohttp

from chatgpt.domain.errors import UpstreamError

ERROR_BODY_LIMIT = 64 * 1024  # enough for any error JSON; an endless error body is not read
# aiohttp refuses a line longer than twice the read buffer (LineTooLong). One chat chunk is a few
# hundred bytes; 1 MiB also fits an upstream that sends a whole long answer as one event.
MAX_LINE_BYTES = 1024 * 1024
SSE = "text/event-stream"


async def read_capped(response: aiohttp.ClientResponse, limit: int = ERROR_BODY_LIMIT) -> bytes:
    """At most `limit` bytes of a response body."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _host(request: aiohttp.ClientRequest) -> str:
    url = request.url
    return f"{url.host}:{url.explicit_port}" if url.explicit_port else str(url.host)


async def raise_for_upstream_status(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a non-2xx answer (or, when SSE was asked for, anything but a 200
    `text/event-stream`) becomes `UpstreamError` before any caller (aiohttp-sse-client included)
    sees it, with its (capped) JSON body readable and the response closed instead of leaking."""
    response = await handler(request)
    if request.headers.get("Accept") == SSE:
        if response.status == 200 and response.content_type == SSE:
            return response
    elif 200 <= response.status < 300:
        return response
    try:
        body = await read_capped(response)
    except (TimeoutError, aiohttp.ClientError):
        body = b""
    finally:
        response.close()
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("retry-after")}
    host = _host(request)
    description = None
    if 200 <= response.status < 300:
        description = (f"the upstream {host} answered HTTP {response.status} "
                       f"{response.content_type or 'without a content type'} instead of an event stream")
    raise UpstreamError(response.status, body, headers, host=host, description=description)


def make_session(connect_timeout: float) -> aiohttp.ClientSession:
    """The app's one upstream session. total=None: aiohttp's default 300 s would cut long answers; no
    sock_read: it restarts on every byte, so keep-alive comments would hold a question forever. The
    callers put their own deadlines on each wait instead (see `upstream.events`)."""
    # `connect` also bounds name resolution and the TLS handshake, which `sock_connect` does not.
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout)
    # limit=0: aiohttp's default pool of 100 connections would make the 101st concurrent answer wait
    # for a free connection and then fail as "unreachable"; answers are long-lived streams.
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, middlewares=(raise_for_upstream_status,),
                                 read_bufsize=MAX_LINE_BYTES // 2)
