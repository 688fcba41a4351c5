"""A paced fake OpenAI upstream for the capacity benchmark: every token stamped with its send time.

    python bench/paced_upstream.py --port 9100 [--tokens 200] [--rate 30] [--keepalive-every 40]

`POST /v1/chat/completions` with `"stream": true` answers like a real OpenAI-compatible upstream:
HTTP/1.1 chunked `text/event-stream`, a role chunk with the first token at once, then one content
token every 1/`rate` s (each ending with its send-time stamp, bench/stamps.py), now and then a
`: keep-alive` comment, a finish chunk, a usage-only chunk (`"choices": []`) when the request asked
`stream_options.include_usage`, and `data: [DONE]`. Without `"stream": true` it answers the whole
completion as JSON. `GET /v1/models` lists one model.

`POST /bench/config {"tokens": n, "rate": r, "keepalive_every": k}` changes the answer for the next
requests (the servers under test do not forward our headers). `GET /bench/stats[?reset=1]` counts
what was served: requests, streams open (and their peak), tokens written and how late the writes
were against their schedule (p50/p99/max ms: this process's own saturation); `reset=1` restarts
the token count and the lateness after reading them.

Written on bare asyncio protocols rather than aiohttp because it shares one core with the load
generator: one timer callback writes every due token of every stream straight to its transport,
so 600 streams at 30 tokens/s (18,000 writes/s) leave that core room for the clients. It speaks
just enough HTTP/1.1 for aiohttp's client: keep-alive, Content-Length or chunked request bodies.
"""
from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import raise_nofile  # noqa: E402
from stamps import WORDS, WORDS_JSON, Histogram, stamp_at  # noqa: E402

DEFAULT_MODEL = "gpt-3.5-turbo"
MAX_HEAD = 65536
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
               b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
KEEP_ALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Stream:
    """One streamed answer: its connection, the bytes every chunk shares, and where it is."""

    __slots__ = ("conn", "head", "tokens", "index", "interval", "due", "usage", "offset", "alive")

    def __init__(self, conn: UpstreamConnection, head: bytes, tokens: int, interval: float, usage: bool,
                 offset: int) -> None:
        self.conn = conn
        self.head = head  # b'data: {"id":"…","object":…,"model":"…","choices":[{"index":0,"delta":'
        self.tokens = tokens
        self.index = 0  # next token to send
        self.interval = interval
        self.due = 0.0
        self.usage = usage
        self.offset = offset  # shifts this stream's keep-alive comments off the others'
        self.alive = True

    def token_event(self, index: int, stamp: bytes) -> bytes:
        """The chunk event of content token `index`, ending with `stamp`."""
        return (self.head + b'{"content":"' + WORDS_JSON[index % len(WORDS_JSON)] + stamp
                + b'"},"finish_reason":null}]}\n\n')

    def tail(self) -> bytes:
        """Finish chunk, the usage-only chunk when asked, [DONE]."""
        out = self.head + b'{},"finish_reason":"stop"}]}\n\n'
        if self.usage:
            # The usage-only chunk has no choices at all: `head` ends inside "choices", so build it anew.
            start = self.head[:self.head.index(b',"choices":')]
            out += (start + b',"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
                    b'"total_tokens":%d}}\n\n' % (self.tokens, self.tokens + 12))
        return out + DONE


class Upstream:
    """The fake's state: answer shape, open streams, the pacing timer and the counters."""

    def __init__(self, tokens: int, rate: float, keepalive_every: int) -> None:
        self.tokens, self.rate, self.keepalive_every = tokens, rate, keepalive_every
        self.ids = itertools.count(1)
        self.seq = itertools.count()
        self.heap: list[tuple[float, int, Stream]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")
        self.late = Histogram()
        self.written = 0  # content tokens written since the last reset
        self.counts = {"requests": 0, "completed": 0, "failed": 0, "in_flight": 0, "peak_in_flight": 0}

    # -- pacing
    def start(self, stream: Stream) -> None:
        """Send the role chunk and the first token now; the rest on the timer."""
        self.counts["requests"] += 1
        self.counts["in_flight"] += 1
        self.counts["peak_in_flight"] = max(self.counts["peak_in_flight"], self.counts["in_flight"])
        first = stream.head + b'{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        stream.conn.write(STREAM_HEAD + chunk(first + self._next(stream)))
        loop = asyncio.get_running_loop()
        stream.due = loop.time() + stream.interval
        self._push(stream)

    def _next(self, stream: Stream) -> bytes:
        """The next piece of `stream`: a token (maybe after a comment), or its tail once all are out."""
        if stream.index >= stream.tokens:
            stream.alive = False
            self.counts["completed"] += 1
            self.counts["in_flight"] -= 1
            return stream.tail()
        index = stream.index
        stream.index += 1
        self.written += 1
        event = stream.token_event(index, stamp_at(time.monotonic_ns()))
        if self.keepalive_every and (index + stream.offset) % self.keepalive_every == self.keepalive_every - 1:
            event = KEEP_ALIVE + event
        return event

    def _push(self, stream: Stream) -> None:
        heapq.heappush(self.heap, (stream.due, next(self.seq), stream))
        if stream.due < self.timer_at:
            self._arm(stream.due)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = asyncio.get_running_loop().call_at(when, self._tick)

    def _tick(self) -> None:
        """Write every piece that is due (or due within 0.5 ms), then sleep until the next one."""
        loop = asyncio.get_running_loop()
        self.timer, self.timer_at = None, float("inf")
        now = loop.time()
        heap = self.heap
        while heap and heap[0][0] <= now + 0.0005:
            due, _, stream = heapq.heappop(heap)
            if not stream.alive:
                continue
            self.late.add((now - due) * 1000)
            piece = self._next(stream)
            if not stream.alive:  # that was the tail: end the chunked body too
                stream.conn.write(chunk(piece) + LAST_CHUNK)
                stream.conn.stream_ended()
                continue
            stream.conn.write(chunk(piece))
            # A late stream keeps its phase but never owes more than one token at once.
            stream.due = max(due + stream.interval, now)
            heapq.heappush(heap, (stream.due, next(self.seq), stream))
        if heap:
            self._arm(heap[0][0])

    def lost(self, stream: Stream) -> None:
        """The reader went away mid-answer."""
        if stream.alive:
            stream.alive = False
            self.counts["failed"] += 1
            self.counts["in_flight"] -= 1

    # -- requests
    def stream_for(self, conn: UpstreamConnection, body: dict[str, Any]) -> Stream:
        """A new streamed answer for a request body."""
        model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_MODEL
        answer_id = "chatcmpl-bench%010d" % next(self.ids)
        head = (b'data: {"id":"' + answer_id.encode() + b'","object":"chat.completion.chunk","created":'
                + str(int(time.time())).encode() + b',"model":' + json.dumps(model).encode()
                + b',"choices":[{"index":0,"delta":')
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        return Stream(conn, head, self.tokens, interval, usage, next(self.seq) % 97)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer: every token at once, all stamped now."""
        stamp = stamp_at(time.monotonic_ns()).decode()
        text = "".join(WORDS[i % len(WORDS)] + stamp for i in range(self.tokens))
        model = body.get("model") if isinstance(body.get("model"), str) else DEFAULT_MODEL
        return {"id": "chatcmpl-bench%010d" % next(self.ids), "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": self.tokens, "total_tokens": self.tokens + 12}}

    def stats(self, reset: bool) -> dict[str, Any]:
        """Counters, tokens written and write lateness since the last reset."""
        out: dict[str, Any] = dict(self.counts)
        out.update({"tokens": self.written, "late_ms_p50": self.late.percentile(50),
                    "late_ms_p99": self.late.percentile(99), "late_ms_max": round(self.late.max, 1),
                    "writes": self.late.n})
        if reset:
            self.written = 0
            self.late = Histogram()
        return out

    def configure(self, body: dict[str, Any]) -> dict[str, Any]:
        """Change the answer's shape for the next requests; the peak of open streams restarts."""
        self.tokens = int(body.get("tokens", self.tokens))
        self.rate = float(body.get("rate", self.rate))
        self.keepalive_every = int(body.get("keepalive_every", self.keepalive_every))
        self.counts["peak_in_flight"] = self.counts["in_flight"]
        return {"tokens": self.tokens, "rate": self.rate, "keepalive_every": self.keepalive_every}


class UpstreamConnection(asyncio.Protocol):
    """One client connection: parses requests one after another (keep-alive), answers each."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.upstream.lost(self.stream)
            self.stream = None
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def stream_ended(self) -> None:
        """The streamed answer is complete: read the next request (or close when asked to)."""
        self.stream = None
        if self.close_after:
            self._close()
        elif self.buffer:
            self.data_received(b"")

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.stream is None and self.transport is not None and not self.close_after:
            request = self._take_request()
            if request is None:
                return
            self._handle(*request)

    def _take_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        """The next complete request in the buffer, removed from it; None while incomplete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._close()
            return None
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            found = _dechunk(self.buffer, start)
            if found is None:
                return None
            body, stop = found
        else:
            stop = start + int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < stop:
                return None
            body = bytes(self.buffer[start:stop])
        del self.buffer[:stop]
        if headers.get("connection", "").lower() == "close":
            self.close_after = True
        return method, target, headers, body

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        url = urlsplit(target)
        path = "/" + url.path.lstrip("/")
        if method == "POST" and path == "/v1/chat/completions":
            try:
                parsed = json.loads(body)
                if not isinstance(parsed, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._json(400, {"error": {"message": "body is not a JSON object", "type": "invalid_request_error"}})
                return
            if parsed.get("stream") is True:
                self.stream = self.upstream.stream_for(self, parsed)
                self.upstream.start(self.stream)
                return
            self._json(200, self.upstream.whole(parsed))
        elif method == "GET" and path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0,
                                                         "owned_by": "bench"}]})
        elif method == "POST" and path == "/bench/config":
            self._json(200, self.upstream.configure(json.loads(body or b"{}")))
        elif method == "GET" and path == "/bench/stats":
            self._json(200, self.upstream.stats(parse_qs(url.query).get("reset") == ["1"]))
        else:
            self._json(404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}})

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (status, reason.encode(), len(payload), payload))
        if self.close_after:
            self._close()


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at `start`: (body, end offset), or None while incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buffer[pos:eol]).split(b";")[0] or b"0", 16)
        pos = eol + 2
        if size == 0:
            end = buffer.find(b"\r\n", pos)  # no trailers expected: the empty line
            return (bytes(body), end + 2) if end >= 0 else None
        if len(buffer) < pos + size + 2:
            return None
        body += buffer[pos:pos + size]
        pos += size + 2


async def serve(host: str, port: int, upstream: Upstream) -> None:
    """Listen until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamConnection(upstream), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=200, help="content tokens per answer")
    parser.add_argument("--rate", type=float, default=30.0, help="tokens/s per stream; 0 = all at once")
    parser.add_argument("--keepalive-every", type=int, default=40, help="a `: keep-alive` comment every N tokens")
    args = parser.parse_args()
    raise_nofile()
    try:
        asyncio.run(serve(args.host, args.port, Upstream(args.tokens, args.rate, args.keepalive_every)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
