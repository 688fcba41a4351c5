"""A fake OpenAI upstream for the benchmark: streams pre-encoded SSE chunks, fast or paced.

    python bench/fake_upstream.py --port 9100 [--tokens 20] [--rate 0]

`POST /v1/chat/completions` answers a stream of `--tokens` content chunks (then a finish chunk
and `data: [DONE]`). `--rate` is tokens per second per stream; 0 writes the whole answer at
once (as fast as possible). Per request, the headers `X-Bench-Tokens` / `X-Bench-Rate`
override the defaults; `POST /bench/config {"tokens": n, "rate": r}` changes the defaults (the
servers under test do not forward our headers) and restarts the count of concurrent streams.
`GET /bench/stats` counts what was served, with the peak of streams open at once.
Chunk bytes are built once per token count; a request only splices in its own completion id.
Paced streams share one timer task instead of one sleeping task each, so 500 paced streams
cost the upstream little CPU (it shares a core with the load generator).
"""
from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_loop, raise_nofile, token_text  # noqa: E402

MODEL = "gpt-3.5-turbo"
PREFIX = b'data: {"id":"'


def _suffix(delta: dict[str, str], finish: str | None) -> bytes:
    rest = {"object": "chat.completion.chunk", "created": 1700000000, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b'",' + json.dumps(rest, ensure_ascii=False, separators=(",", ":")).encode()[1:] + b"\n\n"


class Encoded:
    """The chunks of one answer of `tokens` tokens, minus the completion id."""

    def __init__(self, tokens: int) -> None:
        self.first = _suffix({"role": "assistant", "content": ""}, None)
        self.pieces = [_suffix({"content": t}, None) for t in token_text(tokens)]
        self.last = _suffix({}, "stop")

    def chunks(self, answer_id: bytes) -> list[bytes]:
        """Per write when paced: role+first token, each further token, finish+[DONE] with the last."""
        head = PREFIX + answer_id
        out = [head + self.first + (head + self.pieces[0] if self.pieces else b"")]
        out += [head + p for p in self.pieces[1:]]
        tail = head + self.last + b"data: [DONE]\n\n"
        if len(out) > 1:
            out[-1] += tail
        else:
            out[0] += tail
        return out

    def body(self, answer_id: bytes) -> bytes:
        """The whole answer in one piece (unpaced)."""
        return b"".join(self.chunks(answer_id))


class Pacer:
    """One task writes the next chunk of every paced stream when it is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def add(self, response: web.StreamResponse, chunks: list[bytes], interval: float) -> asyncio.Future[None]:
        """Write chunks[0] now-ish, then one chunk every `interval` s; the future ends with the stream."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = asyncio.get_running_loop().time()
        heapq.heappush(self._heap, (now, next(self._seq), [response, chunks, 0, interval, done]))
        self._wake.set()
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            due = self._heap[0][0]
            if due > now + 0.0005:
                self._wake.clear()
                timer = loop.call_at(due, self._wake.set)  # or earlier, when a stream is added
                await self._wake.wait()
                timer.cancel()
                continue
            _, _, entry = heapq.heappop(self._heap)
            response, chunks, index, interval, done = entry
            if done.done():
                continue
            try:
                await response.write(chunks[index])
            except Exception as exc:  # the reader went away
                done.set_exception(exc)
                continue
            index += 1
            if index >= len(chunks):
                done.set_result(None)
                continue
            entry[2] = index
            heapq.heappush(self._heap, (max(due + interval, now - interval), next(self._seq), entry))


class FakeUpstream:
    """The app's state: defaults, pre-encoded answers, counters."""

    def __init__(self, tokens: int, rate: float) -> None:
        self.tokens, self.rate = tokens, rate
        self.encoded: dict[int, Encoded] = {tokens: Encoded(tokens)}
        self.ids = itertools.count(1)
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "in_flight": 0, "peak_in_flight": 0}
        self.pacer = Pacer()

    def answer(self, tokens: int) -> Encoded:
        enc = self.encoded.get(tokens)
        if enc is None:
            enc = self.encoded[tokens] = Encoded(tokens)
        return enc

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = request.headers
        tokens = int(headers.get("X-Bench-Tokens", self.tokens))
        rate = float(headers.get("X-Bench-Rate", self.rate))
        answer_id = b"chatcmpl-bench-%012d" % next(self.ids)
        chunks = self.answer(tokens).chunks(answer_id)
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            if rate <= 0:
                await response.write(b"".join(chunks))
            else:
                await self.pacer.add(response, chunks, 1.0 / rate)
            await response.write_eof()
            self.stats["completed"] += 1
            return response
        except BaseException:
            self.stats["failed"] += 1
            raise
        finally:
            self.stats["in_flight"] -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model",
                                                               "created": 0, "owned_by": "bench"}]})

    async def config(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokens = int(body.get("tokens", self.tokens))
        self.rate = float(body.get("rate", self.rate))
        self.answer(self.tokens)  # encode now, not during the measurement
        self.stats["peak_in_flight"] = self.stats["in_flight"]  # the peak is counted from here
        return web.json_response({"tokens": self.tokens, "rate": self.rate})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)


def make_app(fake: FakeUpstream) -> web.Application:
    """The upstream's routes and its pacer's lifecycle; callers may add routes before it starts."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/bench/config", fake.config)
    app.router.add_get("/bench/stats", fake.get_stats)

    async def pacer_ctx(app: web.Application):
        fake.pacer.start()
        yield
        await fake.pacer.stop()

    app.cleanup_ctx.append(pacer_ctx)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=20, help="content tokens per answer")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens/s per stream; 0 = all at once")
    args = parser.parse_args()
    raise_nofile()
    web.run_app(make_app(FakeUpstream(args.tokens, args.rate)), host=args.host, port=args.port, print=None,
                access_log=None, backlog=4096, loop=bench_loop())


if __name__ == "__main__":
    main()
