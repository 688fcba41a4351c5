"""The baseline: the least work an aiohttp relay to OpenAI can do, on the project's paths.

    python bench/raw_relay.py --port 9200 --upstream http://127.0.0.1:9100/v1

- `POST /v1/chat/completions`: the request body goes upstream as is; the upstream's bytes come
  back as they arrive. No parsing, no checks, no limits, no keys.
- `/websocket` (and `//websocket`): for each inbound text frame, POST its `messages` upstream
  and send each upstream SSE `data:` line's JSON as a text frame, unchanged; then one
  `{"isDone": true, "content": "DONE"}` frame. No Markdown, no cumulative text, no coalescing.
- `GET /status` (and `//status`): a constant answer, for the benchmark's readiness check.
One ClientSession with no total timeout, as the project has.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import aiohttp
from aiohttp import WSMsgType, web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import raise_nofile  # noqa: E402

session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", str)
DONE_FRAME = json.dumps({"isDone": True, "content": "DONE"})
STATUS = b'{"status":"000000","msg":"SUCCESS","state":true}'


async def status(request: web.Request) -> web.Response:
    return web.Response(body=STATUS, content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json",
               "Authorization": request.headers.get("Authorization", "Bearer sk-bench-0001")}
    async with request.app[session_key].post(request.app[upstream_key] + "/chat/completions", data=body,
                                             headers=headers) as upstream:
        response = web.StreamResponse(status=upstream.status,
                                      headers={"Content-Type": upstream.headers.get("Content-Type", "")})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    session, url = request.app[session_key], request.app[upstream_key] + "/chat/completions"
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        frame = json.loads(message.data)
        body = {"model": "gpt-3.5-turbo", "stream": True,
                "messages": [{"role": m["role"], "content": m["content"]} for m in frame.get("messages") or []]}
        async with session.post(url, json=body, headers={"Authorization": "Bearer sk-bench-0001"}) as upstream:
            async for line in upstream.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    await ws.send_str(line[6:].decode().rstrip())
        await ws.send_str(DONE_FRAME)
    return ws


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[upstream_key] = upstream.rstrip("/")
    for prefix in ("/", "//"):
        app.router.add_get(prefix + "status", status)
        app.router.add_get(prefix + "websocket", websocket)
    app.router.add_post("/v1/chat/completions", chat_completions)

    async def session_ctx(app: web.Application):
        app[session_key] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                                 connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[session_key].close()

    app.cleanup_ctx.append(session_ctx)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100/v1", help="base URL of the fake upstream")
    args = parser.parse_args()
    raise_nofile()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, print=None, access_log=None,
                backlog=4096)


if __name__ == "__main__":
    main()
