"""Operations endpoints: `/healthz` for uptime checks and `/metrics` for Prometheus."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from chatgpt.keys import (metrics_allow_key, metrics_key, pipeline_key, settings_key, sockets_key, started_key,
                          store_key)

if TYPE_CHECKING:
    from chatgpt.server.redis_store import RedisStore


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves: uptime, where answers come from, key health, upstream reachability;
    with Redis configured, whether it answers (`"status": "degraded"` while it does not)."""
    app = request.app
    store = app[store_key]
    # With state.redis_url the store is a RedisStore (imported only then: redis-py is heavy).
    shared = {"redis": cast("RedisStore", store).up} if app[settings_key].state.redis_url else {}
    return web.json_response({
        "status": "degraded" if shared.get("redis") is False else "ok",
        "uptime_s": round(time.monotonic() - app[started_key], 1),
        "provider": app[settings_key].pool_provider,
        **app[pipeline_key].health(),  # serving, keys, upstream_reachable
        **shared,
    })


PROXY_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, only for a direct peer in ops.metrics_allow: a request that came through
    a proxy (it carries a forwarding header) is refused whatever its peer, so nginx never exposes it.
    The gauges are kept current by the code that changes them: a scrape costs no folder scan."""
    app = request.app
    if any(name in request.headers for name in PROXY_HEADERS) or request.remote not in app[metrics_allow_key]:
        raise web.HTTPForbidden(text="/metrics is only served to ops.metrics_allow, never through a proxy.\n")
    registry = app[metrics_key]
    registry.sockets.set(len(app[sockets_key]))
    # Negotiated like prometheus-client's own server: the classic text format unless asked otherwise.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(registry.registry), headers={"Content-Type": content_type})


def add_routes(app: web.Application) -> None:
    """Register `/healthz` and `/metrics`."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
