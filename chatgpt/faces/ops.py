"""Operations endpoints: `/healthz` for uptime checks and `/metrics` for Prometheus."""
from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from chatgpt.keys import metrics_key, pipeline_key, routes_key, settings_key, sockets_key, started_key
from chatgpt.server.images import folder_usage


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves: uptime, where answers come from, key health, upstream reachability."""
    app = request.app
    pipeline = app[pipeline_key]
    upstreams = app[routes_key].upstreams
    return web.json_response({
        "status": "ok",
        "uptime_s": round(time.monotonic() - app[started_key], 1),
        "provider": app[settings_key].pool_provider,
        "serving": pipeline.flags.serving,
        "keys": {"configured": sum(len(u.keys) for u in upstreams),
                 "healthy": sum(u.keys.usable() for u in upstreams)},
        "upstream_reachable": pipeline.upstream_ok,
    })


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the picture folder is measured at scrape time, off the event loop."""
    app = request.app
    registry = app[metrics_key]
    count, size = await asyncio.to_thread(folder_usage, app[settings_key].images.folder)
    registry.images.set(count)
    registry.image_bytes.set(size)
    registry.sockets.set(len(app[sockets_key]))
    # Negotiated like prometheus-client's own server: the classic text format unless asked otherwise.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(registry.registry), headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    """Register `/healthz` and `/metrics`."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
