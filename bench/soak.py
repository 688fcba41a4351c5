"""Soak test: minutes of mixed load with upstream faults; the project's memory and fds each minute.

    python bench/soak.py [--minutes 10] [--rate 20] [--seed 1] [--save-log PATH]

Starts a fault-capable fake upstream (this file, `--serve-upstream`: bench/fake_upstream.py plus
fault markers) and the project (`python app.py --config <tmp settings> --port P`, pinned to core 0
like bench/run.py), then runs `--rate` operations per second (Poisson arrivals) for `--minutes`,
all on 127.0.0.1:

- websocket: persistent sockets (heartbeat every few seconds, reconnecting after 30-90 s with a new
  client address) asking anonymous and own-key questions, image questions, `查询次数`, questions
  whose upstream fails; fresh sockets that leave mid-answer or send malformed / oversized frames;
- `/v1/chat/completions` streamed and not, anonymous / own key / client token, with faults, clients
  that leave mid-stream, malformed bodies; `/chat` two-turn conversations (the second turn checks
  that the server remembered the first), faults, leavers; malformed mini-program requests;
- upstream faults chosen by a marker in the prompt (`#fault:500|429|401|html|notsse|garbage|cut|
  drop|hang|hanghead`), `upstream.read_timeout` is 2 s so hangs end in a timeout;
- one websocket client and one HTTP client hammering to hit the per-IP limiters, one anonymous
  client asking until its daily quota is used up, and every 30 s a burst of 60 clients leaving
  fast /v1 and /chat streams at once.
Before the load, each of the 200 ordinary client addresses touches the per-address tables once
(limiters, quota) and `chat.max_conversations` is 100, so bounded tables are full by minute 2.

Each client sends its own address in `X-Forwarded-For` (loopback is a trusted proxy), so the
per-IP limits and the daily quota apply per client as in production.

One JSON line on stdout before the load (minute 0), one after the warm-up, then one every minute:
the project's VmRSS (MB), open fds, threads, operations done/failed by kind in that minute
(`failed` = the client saw something the contract does not allow: wrong text, no end frame,
timeout, 5xx where a clean error was due), /healthz and /metrics values, the fake upstream's
counters. Then the load stops, the script waits `--settle` seconds and measures once more
("after"), stops the project with SIGTERM, scans its log for tracebacks and prints a summary line
with a verdict: flat when the last minute's RSS is within 10% + 5 MB of minute 2's, the fds are
back within 5 of the baseline and no stream, socket or upstream request is left open; clean when
also no operation failed, the log has no traceback and the project exited 0 at SIGTERM.
Progress goes to stderr. Every process is stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import random
import re
import signal
import struct
import sys
import time
import zlib
from collections import defaultdict
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import fake_upstream as fu  # noqa: E402
from common import emit, raise_nofile, token_text  # noqa: E402
from procs import PY, Bench, Proc, free_port, log  # noqa: E402

POOL_KEYS = ("sk-soak-pool-000000000001", "sk-soak-pool-000000000002", "sk-soak-pool-000000000003")
USER_KEY = "sk-soak-user-000000000009"  # a caller's own key: passed through, not in the pool
CLIENT_TOKEN = "soak-client-token-0001"  # api.client_tokens: the pool without the daily quota
READ_TIMEOUT = 2.0  # upstream.read_timeout in the project's settings
HANG_SECONDS = 6.0  # how long a hanging upstream answer stays silent (> READ_TIMEOUT)
TOKENS = 20  # default answer length of the fake upstream
DAILY_QUESTIONS = 1000  # per anonymous client address; the quota hog (20/s) passes it in under a minute
HTTP_PER_SECOND = 50
WS_PER_MINUTE = 120
IDENTITIES = 200  # ordinary clients' addresses, used in turn: each stays far below the limits
CHAT_MEMORY = 100  # chat.max_conversations: full within two minutes, so eviction runs too
MAX_IN_FLIGHT = 300  # operations at once; more are counted as skipped (load generator saturated)
JOB_TIMEOUT = 30.0
ANSWER_TIMEOUT = 15.0  # the longest fault ends within READ_TIMEOUT; normal answers take ms
PING_EVERY = 5.0
SOCKET_LIFE = (30.0, 90.0)
MARK = re.compile(r"#(fault|tokens|rate|count)(?::([\w.]+))?")


def expected_text(tokens: int = TOKENS) -> str:
    return "".join(token_text(tokens))


# ====================================================================== the faulty upstream

def _png() -> bytes:
    """A valid 1x1 PNG (the project checks the signature; a real file is nicer to serve)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x00\xff\x00\x00"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG_B64 = base64.b64encode(_png()).decode()


def _marks(raw: bytes) -> tuple[dict[str, str], int]:
    """Markers in the last user message of a chat body, and the number of messages."""
    try:
        body = json.loads(raw)
        messages = body["messages"]
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users and isinstance(users[-1], str) else ""
    except (ValueError, KeyError, TypeError):
        return {}, 0
    return {m.group(1): m.group(2) or "" for m in MARK.finditer(text)}, len(messages)


class FaultyUpstream(fu.FakeUpstream):
    """bench/fake_upstream.py's upstream; a prompt with markers gets a fault or a custom answer."""

    def __init__(self, tokens: int, rate: float) -> None:
        super().__init__(tokens, rate)
        self.stats.update(faults=0, client_left=0, images=0)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        marks, count = _marks(raw)
        if not marks:
            return await super().chat(request)
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self.stats["in_flight"])
        try:
            return await self._special(request, marks, count)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self.stats["client_left"] += 1  # the project went away (timeout or its client left)
            return web.Response()
        except BaseException:
            self.stats["failed"] += 1
            raise
        finally:
            self.stats["in_flight"] -= 1

    async def _special(self, request: web.Request, marks: dict[str, str], count: int) -> web.StreamResponse:
        fault = marks.get("fault")
        tokens = int(marks.get("tokens") or self.tokens)
        rate = float(marks.get("rate") or 0)
        answer_id = b"chatcmpl-soak-%012d" % next(self.ids)
        if "count" in marks:  # the answer says how many messages came: /chat memory is checked with it
            head = fu.PREFIX + answer_id
            chunks = [head + fu._suffix({"role": "assistant", "content": ""}, None)
                      + head + fu._suffix({"content": f"messages={count}"}, None),
                      head + fu._suffix({}, "stop") + b"data: [DONE]\n\n"]
        else:
            chunks = self.answer(tokens).chunks(answer_id)
        if fault:
            self.stats["faults"] += 1
        if fault == "500":
            return web.json_response({"error": {"message": "soak: the upstream failed", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        if fault == "429":
            return web.json_response({"error": {"message": "soak: rate limit reached", "type": "requests",
                                                "param": None, "code": "rate_limit_exceeded"}},
                                     status=429, headers={"Retry-After": "1"})
        if fault == "401":
            return web.json_response({"error": {"message": "soak: incorrect API key provided",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "invalid_api_key"}}, status=401)
        if fault == "html":
            return web.Response(status=502, body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                                content_type="text/html")
        if fault == "notsse":
            return web.json_response({"id": answer_id.decode(), "object": "chat.completion", "choices": []})
        if fault == "hanghead":
            await asyncio.sleep(HANG_SECONDS)
            return web.json_response({"error": {"message": "soak: too late"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if fault == "garbage":
            await response.write(chunks[0] + b"data: {this is not json\n\n")
            await response.write_eof()
            return response
        if fault in ("cut", "drop", "hang"):
            await response.write(b"".join(chunks[:max(1, min(3, len(chunks) - 1))]))
            if fault == "drop":
                await asyncio.sleep(0.05)
                if request.transport is not None:
                    request.transport.abort()  # the connection breaks mid-answer: no end of body
                return response
            if fault == "hang":
                await asyncio.sleep(HANG_SECONDS)
            await response.write_eof()  # "cut" (and a late "hang"): ended without [DONE]
            return response
        if rate <= 0:
            await response.write(b"".join(chunks))
        else:
            await self.pacer.add(response, chunks, 1.0 / rate)
        await response.write_eof()
        self.stats["completed"] += 1
        return response

    async def images(self, request: web.Request) -> web.Response:
        await request.read()
        self.stats["images"] += 1
        return web.json_response({"created": int(time.time()), "data": [{"b64_json": PNG_B64}]})


def serve_upstream(port: int) -> None:
    raise_nofile()
    fake = FaultyUpstream(TOKENS, 0.0)
    app = fu.make_app(fake)
    app.router.add_post("/v1/images/generations", fake.images)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096)


# ====================================================================== processes

class SoakBench(Bench):
    """bench/procs.py's Bench with the faulty upstream and soak settings."""

    def start_upstream(self) -> None:
        port = free_port()
        self.upstream = self.spawn("fake_upstream", [PY, str(Path(__file__).resolve()), "--serve-upstream",
                                                     "--port", str(port)], 1)
        self.upstream_base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 20
        while True:
            try:
                self.configure(TOKENS, 0)
                return
            except OSError:
                if not self.upstream.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"fake upstream did not start: {self.upstream.tail()}") from None
                time.sleep(0.05)

    def project_settings(self, port: int) -> Path:
        folder = self.tmp / f"project-{port}"
        (folder / "static").mkdir(parents=True, exist_ok=True)
        keys = ", ".join(f'"{k}"' for k in POOL_KEYS)
        text = f"""# written by bench/soak.py
server:
  host: 127.0.0.1
  port: {port}
  trusted_proxies: [127.0.0.1]   # the soak clients say who they are in X-Forwarded-For
upstream:
  provider: openai
  base_url: {self.upstream_base}
  api_keys: [{keys}]
  connect_timeout: 2
  read_timeout: {READ_TIMEOUT}
limits:
  http_per_second: {HTTP_PER_SECOND}
  ws_per_minute: {WS_PER_MINUTE}
quota:
  daily_questions: {DAILY_QUESTIONS}
chat:
  max_conversations: {CHAT_MEMORY}
api:
  client_tokens: ["{CLIENT_TOKEN}"]
images:
  folder: {folder / 'static'}
state:
  file: {folder / 'state.json'}
logging:
  level: WARNING
"""
        path = folder / "settings.yaml"
        path.write_text(text)
        return path


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS (MB), threads and open fds of `pid`."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


METRICS = {"chatgpt_questions_total": "questions_total", "chatgpt_streams_in_flight": "streams_in_flight",
           "chatgpt_websocket_connections": "websocket_connections",
           "chatgpt_limiter_refusals_total": "limiter_refusals_total",
           "chatgpt_quota_refusals_total": "quota_refusals_total",
           "chatgpt_upstream_errors_total": "upstream_errors_total",
           "chatgpt_images_on_disk": "images_on_disk"}


def parse_metrics(text: str) -> dict[str, float]:
    """Sums over labels of the metrics named in METRICS."""
    out = {short: 0.0 for short in METRICS.values()}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            with suppress(ValueError):
                out[METRICS[name]] += float(line.rsplit(" ", 1)[1])
    return {k: int(v) if v == int(v) else v for k, v in out.items()}


# ====================================================================== the load

class Failed(Exception):
    """The client saw something the contract does not allow."""


class SocketEnded(Exception):
    pass


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.extra: dict[str, int] = defaultdict(int)  # refusals seen, skipped operations, …
        self.samples: dict[str, list[str]] = defaultdict(list)

    def ok(self, kind: str) -> None:
        self.counts[kind][0] += 1

    def fail(self, kind: str, why: str) -> None:
        self.counts[kind][1] += 1
        if len(self.samples[kind]) < 3:
            self.samples[kind].append(why[:300])

    def snapshot(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        return {k: list(v) for k, v in self.counts.items()}, dict(self.extra)


def is_done(frame: dict[str, Any]) -> bool:
    return frame.get("isDone") is True


class Soak:
    def __init__(self, base: str, upstream_stats: str, rate: float, seconds: float, pid: int,
                 rng: random.Random) -> None:
        self.base = base
        self.ws_url = base + "//websocket"
        self.stats_url = upstream_stats
        self.rate = rate
        self.seconds = seconds
        self.pid = pid
        self.rng = rng
        self.tally = Tally()
        self.stopping = asyncio.Event()
        self.idle: list[PersistentSocket] = []
        self.jobs: set[asyncio.Task[None]] = set()
        self.ids = itertools.count(1)
        self.identity_n = itertools.count()
        self.session: aiohttp.ClientSession | None = None
        self.probe_session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- helpers
    def identity(self) -> str:
        n = next(self.identity_n) % IDENTITIES
        return f"10.1.{n >> 8}.{n & 255}"

    def n(self) -> int:
        return next(self.ids)

    def who(self) -> tuple[str, dict[str, str]]:
        """A payer for an HTTP request: anonymous (with an address), own key or client token."""
        roll = self.rng.random()
        headers = {"X-Forwarded-For": self.identity()}
        if roll < 0.5:
            return "anon", headers
        if roll < 0.85:
            return "own", {**headers, "Authorization": f"Bearer {USER_KEY}"}
        return "token", {**headers, "Authorization": f"Bearer {CLIENT_TOKEN}"}

    def fault(self, own: bool) -> str:
        """A fault for a question; key refusals (429, 401) mostly on the caller's own key, since on the
        server's pool they cool or disable keys and would make ordinary questions fail."""
        faults = ["500", "500", "html", "notsse", "garbage", "cut", "drop", "drop", "hang", "hanghead"]
        if own:
            faults += ["429", "429", "401"]
        elif self.rng.random() < 0.1:
            faults += ["429"]  # now and then on the pool: Retry-After 1 s cools one key
        return self.rng.choice(faults)

    async def measure(self) -> dict[str, Any]:
        out: dict[str, Any] = proc_status(self.pid)
        assert self.probe_session is not None
        try:
            async with self.probe_session.get(self.base + "/healthz") as resp:
                health = await resp.json()
            out["healthz"] = {"status": health.get("status"), "keys_healthy": health.get("keys", {}).get("healthy"),
                              "upstream_reachable": health.get("upstream_reachable")}
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out["healthz"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            async with self.probe_session.get(self.base + "/metrics") as resp:
                out["metrics"] = parse_metrics(await resp.text())
        except Exception as exc:  # noqa: BLE001
            out["metrics"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            async with self.probe_session.get(self.stats_url) as resp:
                stats = await resp.json()
            out["upstream"] = {k: stats.get(k) for k in ("requests", "completed", "faults", "client_left",
                                                          "in_flight", "images")}
        except Exception as exc:  # noqa: BLE001
            out["upstream"] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    # ---------------------------------------------------------------- job running
    def launch(self, kind: str) -> None:
        if kind.startswith("ws_p_"):
            if not self.idle:
                self.tally.extra["skipped_no_idle_socket"] += 1
                return
            sock = self.idle.pop(self.rng.randrange(len(self.idle)))
            sock.inbox.put_nowait(kind)
            return
        if len(self.jobs) >= MAX_IN_FLIGHT:
            self.tally.extra["skipped_in_flight_cap"] += 1
            return
        task = asyncio.ensure_future(self.guarded(kind, JOBS[kind](self)))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def guarded(self, kind: str, coro: Any) -> None:
        try:
            async with asyncio.timeout(JOB_TIMEOUT):
                await coro
            self.tally.ok(kind)
        except Failed as exc:
            self.tally.fail(kind, str(exc))
        except TimeoutError:
            self.tally.fail(kind, f"no end within {JOB_TIMEOUT:.0f} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other surprise is a failure with its sample
            self.tally.fail(kind, f"{type(exc).__name__}: {exc}")

    async def scheduler(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        cap = int(self.rate * self.seconds * 1.2) + 100
        at = loop.time()
        for _ in range(cap):
            at += self.rng.expovariate(self.rate)
            if at >= end or self.stopping.is_set():
                return
            await asyncio.sleep(max(0.0, at - loop.time()))
            self.launch(self.rng.choices(kinds, weights)[0])

    # ---------------------------------------------------------------- websocket jobs
    async def ask(self, ws_recv: Any, send: Any, frame: dict[str, Any]) -> list[dict[str, Any]]:
        await send(json.dumps(frame, ensure_ascii=False))
        frames = []
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            got = await ws_recv(deadline - time.monotonic())
            frames.append(got)
            if is_done(got):
                return frames

    def check_answer(self, frames: list[dict[str, Any]], cid: Any, text: str) -> None:
        end, texts = frames[-1], frames[:-1]
        if not (end.get("isSuccess") is True and end.get("content") == "DONE"):
            raise Failed(f"answer did not end with DONE: {json.dumps(end, ensure_ascii=False)[:200]}")
        if not texts or texts[-1].get("content") != text:
            got = texts[-1].get("content") if texts else None
            raise Failed(f"answer text differs: {str(got)[:120]!r}")
        if any(f.get("conversationId") != cid for f in frames):
            raise Failed("conversationId not echoed on every frame")
        if len({f.get("id") for f in texts}) != 1:
            raise Failed("several answer ids in one answer")

    def check_error(self, frames: list[dict[str, Any]]) -> None:
        end = frames[-1]
        if end.get("isSuccess") is not False or not isinstance(end.get("content"), str) or not end["content"]:
            raise Failed(f"fault not reported as an error frame: {json.dumps(end, ensure_ascii=False)[:200]}")
        if sum(1 for f in frames if is_done(f)) != 1:
            raise Failed("more than one end frame")

    async def ws_persistent(self, sock: PersistentSocket, kind: str) -> None:
        n = self.n()
        cid: Any = f"soak-{n}" if n % 5 else n  # numbers are echoed as numbers
        anon = kind in ("ws_p_anon", "ws_p_quota") or (kind in ("ws_p_image", "ws_p_fault") and n % 2 == 0)
        fault = self.fault(own=not anon) if kind == "ws_p_fault" else None
        slow = kind == "ws_p_key" and n % 5 == 0
        prompt = f"Say something, soak question {n}."
        if fault:
            prompt += f" #fault:{fault}"
        if slow:
            prompt += " #tokens:30 #rate:60"
        if kind == "ws_p_quota":
            prompt = "查询次数"
        frame = question(cid, prompt, None if anon else USER_KEY, image=kind == "ws_p_image",
                         context=n % 3 == 0)
        frames = await self.ask(sock.recv, sock.send, frame)
        if kind == "ws_p_quota":
            if len(frames) != 1 or not str(frames[0].get("content", "")).isdigit():
                raise Failed(f"quota answer: {frames}")
        elif kind == "ws_p_image":
            pictures = [f for f in frames if f.get("isImg")]
            if not pictures or frames[-1].get("content") != "DONE":
                raise Failed(f"image answer: {json.dumps(frames, ensure_ascii=False)[:200]}")
            assert self.session is not None
            async with self.session.get(pictures[0]["url"]) as resp:
                body = await resp.read()
                if resp.status != 200 or not body.startswith(b"\x89PNG"):
                    raise Failed(f"saved picture not served: HTTP {resp.status}")
        elif fault:
            self.check_error(frames)
        else:
            self.check_answer(frames, cid, expected_text(30 if slow else TOKENS))

    async def ws_connect(self, identity: str) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        return await self.session.ws_connect(self.ws_url, headers={"X-Forwarded-For": identity},
                                             max_msg_size=0, autoping=True, heartbeat=None)

    async def ws_leave(self) -> None:
        """A fresh socket asks a slow question and leaves after the first text, gently or not."""
        n = self.n()
        ws = await self.ws_connect(self.identity())
        try:
            await ws.send_str(json.dumps(question(f"leave-{n}", f"A long one {n} #tokens:200 #rate:20",
                                                  USER_KEY if n % 2 else None)))
            msg = await ws.receive(ANSWER_TIMEOUT)
            if msg.type != aiohttp.WSMsgType.TEXT or json.loads(msg.data).get("isSuccess") is not True:
                raise Failed(f"no text before leaving: {msg.type.name} {str(msg.data)[:150]}")
        finally:
            if n % 2 and ws._conn is not None and ws._conn.transport is not None:  # noqa: SLF001
                ws._conn.transport.abort()  # noqa: SLF001 - the phone lost its network
            with suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    async def ws_malformed(self) -> None:
        """Garbage on a fresh socket: an error frame for each, then the socket still answers pings.
        Now and then a frame over ws.max_message_bytes, which must close the socket with 1009."""
        n = self.n()
        ws = await self.ws_connect(self.identity())
        try:
            if n % 25 == 0:
                await ws.send_str('{"pad": "' + "x" * 1_100_000 + '"}')
                msg = await ws.receive(10)
                if msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) or ws.close_code != 1009:
                    raise Failed(f"oversized frame: {msg.type.name}, close code {ws.close_code}")
                return
            bad = [lambda: ws.send_str("not json"), lambda: ws.send_str("[1, 2]"),
                   lambda: ws.send_str('{"messages": "x"'), lambda: ws.send_str("null"),
                   lambda: ws.send_bytes(b"\x00\x01\xff"),
                   lambda: ws.send_str(json.dumps(question(n, "x", None) | {"isDemo": "yes"})),
                   lambda: ws.send_str(json.dumps(question(n, "x", None) | {"messages": [1, 2]})),
                   lambda: ws.send_str(json.dumps(question(n, "x", None) | {"conversationId": {"a": 1}})),
                   lambda: ws.send_str(json.dumps(question(n, "   ", None))),
                   lambda: ws.send_str(json.dumps(question(n, "x", None) | {"authType": None, "isDemo": False})),
                   lambda: ws.send_str('{"a":' * 5000 + "1" + "}" * 5000)]
            for send in self.rng.sample(bad, 3):
                await send()
                msg = await ws.receive(10)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise Failed(f"socket ended on a malformed frame: {msg.type.name} {ws.close_code}")
                frame = json.loads(msg.data)
                if not (is_done(frame) and frame.get("isSuccess") is False and frame.get("content")):
                    raise Failed(f"malformed frame answer: {msg.data[:200]}")
            await ws.send_str('{"heart": "ping"}')
            msg = await ws.receive(10)
            if msg.type != aiohttp.WSMsgType.TEXT or json.loads(msg.data).get("heart") != "pong":
                raise Failed(f"no pong after malformed frames: {msg.type.name}")
        finally:
            with suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    # ---------------------------------------------------------------- /v1 jobs
    async def v1(self, kind: str) -> None:
        assert self.session is not None
        n = self.n()
        payer, headers = self.who()
        stream = kind in ("v1_stream", "v1_leave") or (kind == "v1_fault" and n % 2 == 0)
        fault = self.fault(own=payer == "own") if kind == "v1_fault" else None
        prompt = f"Tell me something, soak request {n}."
        if fault:
            prompt += f" #fault:{fault}"
        if kind == "v1_leave":
            prompt += " #tokens:200 #rate:20"
        body = {"model": "gpt-3.5-turbo", "stream": stream,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]}
        async with self.session.post(self.base + "/v1/chat/completions", json=body, headers=headers) as resp:
            if kind == "v1_leave":
                if resp.status != 200:
                    raise Failed(f"HTTP {resp.status}: {(await resp.text())[:150]}")
                seen = b""
                while b'"content":"' not in seen.replace(b'"content":""', b""):
                    chunk = await resp.content.readany()
                    if not chunk:
                        raise Failed("stream ended before any text")
                    seen += chunk
                resp.close()  # leave mid-answer: the connection is dropped
                return
            raw = await resp.read()
        if fault:
            if resp.status >= 400:
                if resp.status >= 500 and resp.status not in (502, 503, 504):
                    raise Failed(f"fault {fault}: HTTP {resp.status}")
                err = json.loads(raw).get("error")
                if not isinstance(err, dict) or not err.get("message"):
                    raise Failed(f"fault {fault}: HTTP {resp.status} without an OpenAI error: {raw[:150]!r}")
                return
            if stream and b'data: {"error"' in raw and not raw.endswith(b"data: [DONE]\n\n"):
                return
            raise Failed(f"fault {fault} not reported (HTTP {resp.status}): {raw[-150:]!r}")
        if resp.status != 200:
            raise Failed(f"HTTP {resp.status}: {raw[:200]!r}")
        if stream:
            if not raw.endswith(b"data: [DONE]\n\n"):
                raise Failed(f"stream did not end with [DONE]: {raw[-100:]!r}")
            text = ""
            for line in raw.split(b"\n"):
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["delta"].get("content") or ""
        else:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        if text != expected_text():
            raise Failed(f"answer text differs: {text[:120]!r}")

    async def v1_malformed(self) -> None:
        assert self.session is not None
        cases: list[tuple[bytes, str]] = [
            (b"", "application/json"), (b"{not json", "application/json"), (b"[1, 2]", "application/json"),
            (b'{"messages": "x"}', "application/json"), (b'{"messages": []}', "application/json"),
            (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "application/json"),
            (b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', "application/json"),
            (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "application/json"),
            (b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-nope"}', "application/json"),
            (b"\xff\xfe\xfd{", "application/json"), (b"messages=hello", "application/x-www-form-urlencoded"),
            (b'{"messages": [{"role": 5}]}', "text/plain")]
        raw, ctype = self.rng.choice(cases)
        async with self.session.post(self.base + "/v1/chat/completions", data=raw,
                                     headers={"Content-Type": ctype, "X-Forwarded-For": self.identity()}) as resp:
            body = await resp.read()
        if not 400 <= resp.status < 500:
            raise Failed(f"malformed /v1 body {raw[:40]!r}: HTTP {resp.status} {body[:150]!r}")
        if not isinstance(json.loads(body).get("error"), dict):
            raise Failed(f"malformed /v1 body {raw[:40]!r}: not an OpenAI error: {body[:150]!r}")

    # ---------------------------------------------------------------- /chat and mini-program HTTP jobs
    async def chat_post(self, content: str, cid: str, headers: dict[str, str], sse: bool) -> tuple[int, str]:
        status, text, _ = await self.chat_turn(content, cid, headers, sse)
        return status, text

    async def chat_turn(self, content: str, cid: str | None, headers: dict[str, str],
                        sse: bool) -> tuple[int, str, str]:
        """One /chat request: status, body and the conversation id the server issued."""
        assert self.session is not None
        if sse:
            headers = {**headers, "Accept": "text/event-stream"}
        body = {"content": content} if cid is None else {"content": content, "conversationId": cid}
        async with self.session.post(self.base + "/chat", json=body, headers=headers) as resp:
            return (resp.status, (await resp.read()).decode(errors="replace"),
                    resp.headers.get("X-Conversation-Id", ""))

    async def chat2(self) -> None:
        n = self.n()
        _, headers = self.who()
        cid: str | None = None  # the server issues the id (and binds it to this client)
        sse = n % 3 == 0
        for turn, want in ((1, "messages=1"), (2, "messages=3")):
            status, text, cid = await self.chat_turn(f"Turn {turn} of {n} #count", cid, headers, sse)
            if status != 200 or want not in text or "[error]" in text or "event: error" in text:
                raise Failed(f"/chat turn {turn}: HTTP {status} {text[:150]!r} (wanted {want})")

    async def chat_fault(self) -> None:
        n = self.n()
        payer, headers = self.who()
        fault = self.fault(own=payer == "own")
        status, text = await self.chat_post(f"Fail please {n} #fault:{fault}", f"soak-cf-{n}", headers, n % 2 == 0)
        if status >= 400:
            if status >= 500 and status not in (502, 503, 504):
                raise Failed(f"/chat fault {fault}: HTTP {status}")
            return
        if "[error]" in text or "event: error" in text:
            return
        raise Failed(f"/chat fault {fault} not reported: HTTP {status} {text[-150:]!r}")

    async def chat_leave(self) -> None:
        assert self.session is not None
        n = self.n()
        _, headers = self.who()
        async with self.session.post(self.base + "/chat", json={"content": f"Long {n} #tokens:200 #rate:20"},
                                     headers=headers) as resp:
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}")
            if not await resp.content.readany():
                raise Failed("no text before leaving")
            resp.close()

    async def http_misc(self) -> None:
        """Mini-program routes, good and bad: envelopes, path tricks, malformed /chat bodies."""
        assert self.session is not None
        headers = {"X-Forwarded-For": self.identity()}
        cases: list[tuple[str, str, bytes | None, str, Any]] = [
            # method, path, body, content type, expected: "ok" envelope, "err" envelope, or HTTP status set
            ("GET", "//status", None, "", "ok"), ("GET", "//announcement", None, "", "ok"),
            ("GET", "//demoChatList", None, "", "ok"), ("GET", "/", None, "", "ok"),
            ("POST", "//api/auth/apikey/verify", json.dumps({"apiKey": USER_KEY}).encode(), "application/json", "ok"),
            ("POST", "//api1/auth/apikey/verify", b"", "application/json", "err"),
            ("POST", "//api/auth/apikey/verify", b"{oops", "application/json", "err"),
            ("POST", "//api/auth/apikey/verify", b'{"apiKey": ""}', "application/json", "err"),
            ("POST", "//api/auth", b'{"email": "a@b", "password": "x"}', "application/json", "err"),
            ("GET", "//backend-api/conversations", None, "", "err"),
            ("GET", "//res/..%2f..%2fetc%2fpasswd", None, "", {404}),
            ("GET", "/res/../../etc/passwd", None, "", {404}),
            ("GET", "//no/such/" + "a" * 2000, None, "", {404}),
            ("POST", "/chat", b"", "application/json", {400}),
            ("POST", "/chat", b'{"content": 5}', "application/json", {400}),
            ("POST", "/chat", b'{"content": "hi", "conversationId": "bad id!"}', "application/json", {400}),
            ("POST", "/chat", b"\x00\x01garbage", "text/plain", {400}),
        ]
        method, path, body, ctype, want = self.rng.choice(cases)
        if ctype:
            headers["Content-Type"] = ctype
        async with self.session.request(method, self.base + path, data=body, headers=headers) as resp:
            raw = await resp.read()
        if isinstance(want, set):
            if resp.status not in want:
                raise Failed(f"{method} {path[:60]}: HTTP {resp.status}, wanted {sorted(want)}")
            return
        if resp.status != 200:
            raise Failed(f"{method} {path[:60]}: HTTP {resp.status}")
        status = json.loads(raw).get("status")
        if (status == "000000") != (want == "ok") or not isinstance(status, str) or len(status) != 6:
            raise Failed(f"{method} {path[:60]}: envelope status {status!r}, wanted {want}")

    # ---------------------------------------------------------------- background abusers
    async def ws_hammer(self, end: float) -> None:
        """One client address asks as fast as it can in bursts: the websocket limiter must refuse."""
        loop = asyncio.get_running_loop()
        while loop.time() < end and not self.stopping.is_set():
            try:
                ws = await self.ws_connect("10.9.0.1")
                try:
                    for i in range(WS_PER_MINUTE + 30):
                        if self.stopping.is_set():
                            break
                        frames = await self.ask(lambda t, ws=ws: recv_frame(ws, t), ws.send_str,
                                                question(f"h-{i}", f"hammer {i}", USER_KEY))
                        end_frame = frames[-1]
                        if end_frame.get("content") == "DONE":
                            self.tally.ok("ws_hammer")
                        elif end_frame.get("isSuccess") is False and "频繁" in str(end_frame.get("content")):
                            self.tally.ok("ws_hammer")
                            self.tally.extra["ws_hammer_refused"] += 1
                        else:
                            self.tally.fail("ws_hammer", json.dumps(end_frame, ensure_ascii=False)[:200])
                finally:
                    await ws.close()
            except (Failed, SocketEnded, TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.tally.fail("ws_hammer", f"{type(exc).__name__}: {exc}")
            await self.pause(15)

    async def http_hammer(self, end: float) -> None:
        """One address sends bursts of 120 //status and 80 /v1 requests at once: 700001 / 429 expected."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        headers = {"X-Forwarded-For": "10.9.0.2"}
        body = {"messages": [{"role": "user", "content": "hammer"}]}

        async def one(i: int) -> None:
            try:
                if i % 5 < 3:
                    async with self.session.get(self.base + "//status", headers=headers) as resp:
                        status = (await resp.json()).get("status") if resp.status == 200 else None
                    refused, ok = status == "700001", status == "000000"
                else:
                    async with self.session.post(self.base + "/v1/chat/completions", json=body,
                                                 headers={**headers, "Authorization": f"Bearer {USER_KEY}"}) as resp:
                        await resp.read()
                    refused, ok = resp.status == 429 and "Retry-After" in resp.headers, resp.status == 200
                if ok or refused:
                    self.tally.ok("http_hammer")
                    if refused:
                        self.tally.extra["http_hammer_refused"] += 1
                else:
                    self.tally.fail("http_hammer", f"HTTP {resp.status}")
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
                self.tally.fail("http_hammer", f"{type(exc).__name__}: {exc}")

        while loop.time() < end and not self.stopping.is_set():
            await asyncio.gather(*(one(i) for i in range(200)))
            await self.pause(15)

    async def leave_burst(self, end: float) -> None:
        """Every 30 s, 60 clients at once leave /v1 and /chat streams that are being written fast:
        the write after a client left must not become a traceback in the log."""
        loop = asyncio.get_running_loop()
        while loop.time() < end and not self.stopping.is_set():
            await asyncio.gather(*(self.guarded("leave_burst", self.fast_leave(i)) for i in range(60)))
            await self.pause(30)

    async def fast_leave(self, i: int) -> None:
        assert self.session is not None
        n = self.n()
        _, headers = self.who()
        prompt = f"Fast {n} #tokens:400 #rate:{self.rng.choice([200, 1000, 2000])}"
        path, body = (("/v1/chat/completions", {"stream": True, "messages": [{"role": "user", "content": prompt}]})
                      if i % 2 else ("/chat", {"content": prompt}))
        async with self.session.post(self.base + path, json=body, headers=headers) as resp:
            if resp.status != 200:
                raise Failed(f"{path}: HTTP {resp.status}")
            if not await resp.content.readany():
                raise Failed(f"{path}: no text before leaving")
            await asyncio.sleep(self.rng.random() * 0.05)
            resp.close()

    async def quota_hog(self, end: float) -> None:
        """One anonymous address asks 20 times a second until its daily quota is gone, and on."""
        assert self.session is not None
        loop = asyncio.get_running_loop()
        headers = {"X-Forwarded-For": "10.9.0.3"}
        body = {"messages": [{"role": "user", "content": "hog"}]}
        while loop.time() < end and not self.stopping.is_set():
            try:
                async with self.session.post(self.base + "/v1/chat/completions", json=body, headers=headers) as resp:
                    raw = await resp.read()
                if resp.status == 200:
                    self.tally.ok("quota_hog")
                elif resp.status == 429 and b"daily_quota_exceeded" in raw:
                    self.tally.ok("quota_hog")
                    self.tally.extra["quota_hog_refused"] += 1
                else:
                    self.tally.fail("quota_hog", f"HTTP {resp.status}: {raw[:150]!r}")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.tally.fail("quota_hog", f"{type(exc).__name__}: {exc}")
            await self.pause(0.05)

    async def warm_up(self) -> dict[str, Any]:
        """Every ordinary client address touches every per-address table once (the HTTP, /v1 and
        websocket limiters, the daily quota), so the tables are full before the load starts and
        memory growth after minute 2 is not their filling."""
        assert self.session is not None
        gate = asyncio.Semaphore(20)
        started = time.monotonic()
        result = {"phase": "warm-up", "identities": IDENTITIES, "done": 0, "failed": 0}

        async def one(i: int) -> None:
            ident = f"10.1.{i >> 8}.{i & 255}"
            headers = {"X-Forwarded-For": ident}
            async with gate:
                try:
                    async with self.session.get(self.base + "//status", headers=headers) as resp:
                        await resp.read()
                    async with self.session.post(self.base + "/v1/chat/completions", data=b"",
                                                 headers=headers) as resp:
                        await resp.read()  # 400: only the limiter and the body check ran
                    ws = await self.ws_connect(ident)
                    try:
                        frames = await self.ask(lambda t: recv_frame(ws, t), ws.send_str,
                                                question(f"w-{i}", "warm up", None))
                    finally:
                        await ws.close()
                    ok = frames[-1].get("content") == "DONE"
                except (Failed, SocketEnded, TimeoutError, aiohttp.ClientError, OSError):
                    ok = False
                result["done" if ok else "failed"] += 1

        await asyncio.gather(*(one(i) for i in range(IDENTITIES)))
        result["seconds"] = round(time.monotonic() - started, 1)
        return result

    async def pause(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


async def recv_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any]:
    """The next JSON text frame; heartbeat answers are skipped."""
    while True:
        msg = await ws.receive(max(timeout, 0.01))
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise SocketEnded(f"socket ended: {msg.type.name} (close code {ws.close_code})")
        frame = json.loads(msg.data)
        if not (isinstance(frame, dict) and frame.get("heart") == "pong"):
            return frame


def question(cid: Any, prompt: str, key: str | None, *, image: bool = False,
             context: bool = False) -> dict[str, Any]:
    """The mini-program's question frame (tests/test_ws.py `question()`)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    messages: list[dict[str, Any]] = []
    if context:
        messages += [{"role": "user", "content": "Earlier question", "html": "<p>Earlier question</p>",
                      "isSend": True, "createTime": when, "id": "u-0"},
                     {"role": "assistant", "content": "Earlier answer", "html": "<p>Earlier answer</p>",
                      "isSend": False, "isDone": True, "createTime": when, "id": "a-0"}]
    messages.append({"role": "user", "content": prompt, "html": f"<p>{prompt}</p>", "isSend": True,
                     "createTime": when, "id": f"u-{cid}"})
    return {"conversationId": cid, "id": f"u-{cid}", "parentId": 1, "authType": "api",
            "authValue": f"Bearer {key}" if key else "Bearer ", "isDemo": key is None,
            "content": prompt if image else "", "isGenImg": image, "isSender": False, "messages": messages}


class PersistentSocket:
    """A mini-program client: one socket, a heartbeat every PING_EVERY s, questions one at a time;
    after its lifetime it reconnects with the next client address."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.inbox: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.next_ping = 0.0
        self.pings: list[float] = []  # send times of pings without a pong yet

    async def send(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send_str(text)

    async def ping(self) -> None:
        now = time.monotonic()
        if self.pings and now - self.pings[0] > 3 * PING_EVERY:
            self.soak.tally.fail("ws_heartbeat", f"no pong within {3 * PING_EVERY:.0f} s")
            self.pings.pop(0)
        await self.send('{"heart": "ping"}')
        self.pings.append(now)
        self.next_ping = now + PING_EVERY

    async def recv(self, timeout: float, want_pong: bool = False) -> dict[str, Any]:
        """The next non-heartbeat frame (or a pong if `want_pong`); sends pings while waiting."""
        assert self.ws is not None
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise Failed(f"no frame within {timeout:.0f} s")
            if now >= self.next_ping:
                await self.ping()
            try:
                msg = await self.ws.receive(max(0.01, min(deadline, self.next_ping) - now))
            except TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise SocketEnded(f"socket ended: {msg.type.name} (close code {self.ws.close_code})")
            frame = json.loads(msg.data)
            if isinstance(frame, dict) and frame.get("heart") == "pong":
                if not isinstance(frame.get("time"), int):
                    self.soak.tally.fail("ws_heartbeat", f"pong without time: {msg.data[:100]}")
                elif self.pings:
                    self.pings.pop(0)
                    self.soak.tally.ok("ws_heartbeat")
                if want_pong:
                    return frame
                continue
            if want_pong:
                raise Failed(f"unexpected frame on an idle socket: {msg.data[:150]}")
            return frame

    async def run(self) -> None:
        soak = self.soak
        while not soak.stopping.is_set():
            try:
                self.ws = await soak.ws_connect(soak.identity())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                soak.tally.fail("ws_connect", f"{type(exc).__name__}: {exc}")
                await soak.pause(1)
                continue
            soak.tally.ok("ws_connect")
            self.pings.clear()
            self.next_ping = time.monotonic() + soak.rng.uniform(0, PING_EVERY)
            life_end = time.monotonic() + soak.rng.uniform(*SOCKET_LIFE)
            soak.idle.append(self)
            try:
                while not soak.stopping.is_set() and time.monotonic() < life_end:
                    wait = max(0.01, min(self.next_ping, life_end) - time.monotonic())
                    try:
                        kind = await asyncio.wait_for(self.inbox.get(), wait)
                    except TimeoutError:
                        if time.monotonic() >= self.next_ping:
                            await self.ping()
                            await self.recv(10, want_pong=True)
                        continue
                    ok = await self.job(kind)
                    if not ok:
                        break  # the socket's state is unknown: start over on a new one
                    soak.idle.append(self)
            except (Failed, SocketEnded, aiohttp.ClientError, OSError, TimeoutError) as exc:
                soak.tally.fail("ws_heartbeat", f"idle socket: {type(exc).__name__}: {exc}")
            finally:
                with suppress(ValueError):
                    soak.idle.remove(self)
                while not self.inbox.empty():  # a job handed over just now: count it as skipped
                    self.inbox.get_nowait()
                    soak.tally.extra["skipped_no_idle_socket"] += 1
                with suppress(Exception):
                    await asyncio.wait_for(self.ws.close(), 2)

    async def job(self, kind: str) -> bool:
        try:
            async with asyncio.timeout(JOB_TIMEOUT):
                await self.soak.ws_persistent(self, kind)
            self.soak.tally.ok(kind)
            return True
        except Failed as exc:
            self.soak.tally.fail(kind, str(exc))
            return not str(exc).startswith("no frame within")
        except (SocketEnded, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self.soak.tally.fail(kind, f"{type(exc).__name__}: {exc}")
            return False


# weights of the operations the scheduler starts (ws_p_*: on an idle persistent socket)
WEIGHTS = {
    "ws_p_anon": 20, "ws_p_key": 10, "ws_p_image": 2, "ws_p_quota": 1, "ws_p_fault": 8,
    "ws_leave": 3, "ws_malformed": 2,
    "v1_stream": 12, "v1_plain": 8, "v1_fault": 6, "v1_leave": 3, "v1_malformed": 3,
    "chat2": 6, "chat_fault": 2, "chat_leave": 1, "http_misc": 3,
}
JOBS = {
    "ws_leave": lambda s: s.ws_leave(), "ws_malformed": lambda s: s.ws_malformed(),
    "v1_stream": lambda s: s.v1("v1_stream"), "v1_plain": lambda s: s.v1("v1_plain"),
    "v1_fault": lambda s: s.v1("v1_fault"), "v1_leave": lambda s: s.v1("v1_leave"),
    "v1_malformed": lambda s: s.v1_malformed(), "chat2": lambda s: s.chat2(),
    "chat_fault": lambda s: s.chat_fault(), "chat_leave": lambda s: s.chat_leave(),
    "http_misc": lambda s: s.http_misc(),
}
PERSISTENT_JOBS = {k for k in WEIGHTS if k.startswith("ws_p_")}


def delta(now: dict[str, list[int]], before: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    out = {}
    for kind in sorted(now):
        done, failed = (a - b for a, b in zip(now[kind], before.get(kind, [0, 0]), strict=True))
        if done or failed:
            out[kind] = {"done": done, "failed": failed}
    return out


async def run_soak(args: argparse.Namespace, base: str, upstream_stats: str, pid: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    seconds = args.minutes * 60
    soak = Soak(base, upstream_stats, args.rate, seconds, pid, rng)
    lines: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=0)
    soak.session = aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    soak.probe_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    loop = asyncio.get_running_loop()
    background: list[asyncio.Task[Any]] = []
    try:
        baseline = await soak.measure()
        emit({"minute": 0, "phase": "before load", **baseline})
        lines.append({"minute": 0, **baseline})
        emit(await soak.warm_up())
        start = loop.time()
        end = start + seconds
        sockets = [PersistentSocket(soak) for _ in range(max(16, int(args.rate)))]
        background += [asyncio.ensure_future(s.run()) for s in sockets]
        background += [asyncio.ensure_future(soak.ws_hammer(end)), asyncio.ensure_future(soak.http_hammer(end)),
                       asyncio.ensure_future(soak.quota_hog(end)), asyncio.ensure_future(soak.leave_burst(end))]
        scheduler = asyncio.ensure_future(soak.scheduler(end))
        background.append(scheduler)
        before = soak.tally.snapshot()
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, start + 60 * minute - loop.time()))
            counts, extra = soak.tally.snapshot()
            line = {"minute": minute, **await soak.measure(), "requests": delta(counts, before[0]),
                    "refused_or_skipped": {k: v - before[1].get(k, 0) for k, v in extra.items()
                                           if v - before[1].get(k, 0)},
                    "in_flight_jobs": len(soak.jobs)}
            before = (counts, extra)
            emit(line)
            lines.append(line)
        log("load stopping")
        soak.stopping.set()
        await scheduler
        if soak.jobs:
            await asyncio.wait(list(soak.jobs), timeout=JOB_TIMEOUT + 5)
        await asyncio.wait(background, timeout=JOB_TIMEOUT + 5)
        soak.stopping.set()
        await stop_tasks([*background, *soak.jobs])
        await soak.session.close()
        log(f"load stopped; settling {args.settle:.0f} s (the project's upstream keep-alive is 15 s)")
        await asyncio.sleep(args.settle)
        after = await soak.measure()
    finally:  # also on Ctrl-C: no task or connection of ours outlives the run
        soak.stopping.set()
        await stop_tasks([*background, *soak.jobs])
        await soak.session.close()
        await soak.probe_session.close()
    counts, extra = soak.tally.snapshot()
    emit({"minute": "after", "phase": f"{args.settle:.0f} s after the load stopped", **after})
    totals = {k: {"done": v[0], "failed": v[1]} for k, v in sorted(counts.items())}
    return {"lines": lines, "after": after, "totals": totals, "extra": extra,
            "samples": {k: v for k, v in soak.tally.samples.items() if v}}


async def stop_tasks(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def scan_log(path: Path) -> dict[str, Any]:
    """Tracebacks (deduplicated by their last line), ERROR / WARNING counts, leaked secrets."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    tracebacks: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        j = i + 1
        while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
            j += 1
        block = lines[max(0, i - 1):j + 1]
        last = lines[j] if j < len(lines) else "?"
        # grouped by the exception and the innermost frame outside the standard library and venv
        own = [ln.strip() for ln in block if ln.strip().startswith('File "') and "site-packages" not in ln
               and "/lib/python3" not in ln]
        where = own[-1] if own else "?"
        entry = tracebacks.setdefault(f"{last} @ {where}", {"count": 0, "stack": "\n".join(block)[-3000:]})
        entry["count"] += 1
    warnings: dict[str, int] = defaultdict(int)
    for line in lines:
        for level in (" ERROR ", " WARNING ", " CRITICAL "):
            if level in line:
                # group by logger and the start of the message, without numbers
                key = re.sub(r"\d+", "N", line.split(level, 1)[1])[:90]
                warnings[level.strip() + " " + key] += 1
    secrets = sum(text.count(k) for k in (*POOL_KEYS, USER_KEY, CLIENT_TOKEN))
    return {"lines": len(lines), "tracebacks": sum(t["count"] for t in tracebacks.values()),
            "traceback_kinds": [{"exception": k, **v} for k, v in tracebacks.items()],
            "top_log_lines": dict(sorted(warnings.items(), key=lambda kv: -kv[1])[:12]),
            "secrets_in_log": secrets}


def stop_project(proc: Proc) -> dict[str, Any]:
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    try:
        rc = proc.popen.wait(15)
    except Exception:  # noqa: BLE001
        rc = None
    return {"exit_code": rc, "stop_s": round(time.monotonic() - started, 2)}


def summarize(result: dict[str, Any], stop: dict[str, Any], log_scan: dict[str, Any]) -> dict[str, Any]:
    lines = result["lines"]
    minutes = [ln for ln in lines if ln["minute"] != 0]
    baseline, after = lines[0], result["after"]
    rss = [ln["rss_mb"] for ln in minutes]
    fds = [ln["fds"] for ln in minutes]
    ref = next((ln for ln in minutes if ln["minute"] == 2), minutes[0])
    last = minutes[-1]
    rss_limit = round(ref["rss_mb"] * 1.10 + 5, 1)
    rss_flat = last["rss_mb"] <= rss_limit
    fds_back = after["fds"] <= baseline["fds"] + 5
    metrics = after.get("metrics", {})
    drained = (metrics.get("streams_in_flight") == 0 and metrics.get("websocket_connections") == 0
               and after.get("upstream", {}).get("in_flight") == 0)
    totals = result["totals"]
    done = sum(v["done"] for v in totals.values())
    failed = sum(v["failed"] for v in totals.values())
    problems = []
    if not rss_flat:
        problems.append(f"RSS grew: last minute {last['rss_mb']} MB > {rss_limit} MB "
                        f"(minute {ref['minute']} +10% +5 MB)")
    if not fds_back:
        problems.append(f"fds not back: {after['fds']} after the load vs {baseline['fds']} before")
    if not drained:
        problems.append("streams, sockets or upstream requests still open after the load")
    if log_scan["tracebacks"]:
        problems.append(f"{log_scan['tracebacks']} traceback(s) in the project's log")
    if stop["exit_code"] != 0:
        problems.append(f"project exit code {stop['exit_code']} at SIGTERM")
    return {
        "summary": True, "minutes": len(minutes),
        "rss_mb": {"before": baseline["rss_mb"], "first": rss[0], "minute2": ref["rss_mb"], "last": rss[-1],
                   "max": max(rss), "after": after["rss_mb"]},
        "fds": {"before": baseline["fds"], "first": fds[0], "last": fds[-1], "max": max(fds), "after": after["fds"]},
        "threads": {"before": baseline["threads"], "max": max(ln["threads"] for ln in minutes),
                    "after": after["threads"]},
        "operations": {"done": done, "failed": failed, "failed_pct": round(100 * failed / max(done + failed, 1), 2)},
        "by_kind": totals, "refused_or_skipped": result["extra"], "failure_samples": result["samples"],
        "metrics_after": metrics, "upstream_after": after.get("upstream"),
        "project_stop": stop, "log": log_scan,
        "verdict": {"rss_flat": rss_flat, "fds_back_to_baseline": fds_back, "drained": drained,
                    "flat": rss_flat and fds_back and drained,
                    "clean": not problems and failed == 0, "problems": problems},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="operations started per second (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds between the end of the load and "
                                                                     "the last measurement (default 20)")
    parser.add_argument("--save-log", type=Path, default=Path("/tmp/chatgpt-soak-project.log"),
                        help="where the project's log is copied (default /tmp/chatgpt-soak-project.log)")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.port)
        return 0
    if args.minutes < 1 or args.rate <= 0:
        parser.error("--minutes must be at least 1 and --rate positive")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_nofile()
    bench = SoakBench(quick=False)
    if bench.pinned:
        os.sched_setaffinity(0, {1})
    log(f"soak: {args.minutes} min at {args.rate}/s; pinned: {bench.pinned}; workdir {bench.tmp}")
    try:
        bench.start_upstream()
        project, base = bench.start_project()
        log(f"project pid {project.pid} at {base}; upstream {bench.upstream_base}")
        result = asyncio.run(run_soak(args, base, bench.upstream_base.rsplit("/v1", 1)[0] + "/bench/stats",
                                      project.pid))
        stop = stop_project(project)
        project.stop()
        args.save_log.write_bytes(project.log_path.read_bytes())
        log_scan = scan_log(args.save_log)
        log_scan["saved"] = str(args.save_log)
        emit(summarize(result, stop, log_scan))
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        bench.close()
        log("all processes stopped")


if __name__ == "__main__":
    sys.exit(main())
