"""`/admin/*`: runtime flags, key health and quota resets for the operator, behind a bearer token."""
from __future__ import annotations

import hmac
import json
import logging
import math
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain.store import StoreUnavailable
from chatgpt.keys import (admin_failures_key, flags_key, pipeline_key, pruner_key, routes_key, settings_key,
                          state_key)
from chatgpt.server.bodies import read_raw
from chatgpt.server.clientip import identity_of_text
from chatgpt.server.guards import identity_of

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=jsontext.dumps)


def _error(status: int, message: str, retry_after: float | None = None) -> web.HTTPException:
    """An admin failure as JSON with a real HTTP status."""
    text = json.dumps({"error": {"message": message, "type": "admin_error", "param": None, "code": None}})
    kinds: dict[int, type[web.HTTPException]] = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized,
                                                  404: web.HTTPNotFound, 429: web.HTTPTooManyRequests,
                                                  503: web.HTTPServiceUnavailable}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return kinds[status](text=text, content_type="application/json", headers=headers or None)


def token_matches(authorization: str, token: str) -> bool:
    """`Bearer <token>`, compared in constant time. Any odd header (no scheme, raw non-UTF-8 bytes,
    which aiohttp hands over as surrogates) is simply not the token."""
    scheme, _, given = authorization.partition(" ")
    try:
        offered = given.strip().encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(offered, token.encode())


async def require_admin(request: web.Request) -> None:
    """401 unless the bearer token matches (constant-time); 404 when no token is configured; 429 for
    an address past ADMIN_FAILURES wrong tokens in a minute (PROTOCOL.md E.3), whatever it sends.
    The failures are kept in the store: with Redis, every instance counts them together."""
    token = request.app[settings_key].admin.token
    if not token:
        raise _error(404, "The admin API is off: set admin.token or CHATGPT_ADMIN_TOKEN.")
    address = identity_of(request)
    failures = request.app[admin_failures_key]
    wait = await failures.retry_after(address)
    if wait > 0:
        raise _error(429, "Too many wrong admin tokens from this address: try again later.", wait)
    if not token_matches(request.headers.get("Authorization", ""), token):
        await failures.record(address)
        if await failures.retry_after(address) > 0:
            log.warning("admin API: %d wrong tokens from %s within %.0f s; refusing it for a while",
                        failures.max_failures, address, failures.window)
        raise _error(401, "A valid admin bearer token is required.")


async def _save(app: web.Application) -> None:
    """Write the state file now (there is none when the state is shared through Redis)."""
    state = app.get(state_key)
    if state is not None:
        await state.save()


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = jsontext.parse(await read_raw(request) or b"{}")
    except ValueError:
        raise _error(400, "The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise _error(400, "The body must be a JSON object.")
    return body


async def get_runtime(request: web.Request) -> web.Response:
    """The current runtime flags."""
    await require_admin(request)
    return _json(request.app[flags_key].as_dict())


async def patch_runtime(request: web.Request) -> web.Response:
    """Change some flags at once (all checked before any is applied); saved to the state file."""
    await require_admin(request)
    try:
        flags = await request.app[flags_key].change(await _body(request))
    except ValueError as error:
        raise _error(400, str(error)) from None
    await _save(request.app)
    log.info("runtime flags changed by the admin API: %s", ", ".join(sorted(flags)))
    return _json(flags)


async def get_keys(request: web.Request) -> web.Response:
    """Health of each server key, masked to its last 4 characters, with the upstream it belongs to and
    its tokens today per model (summed over every instance when the state is shared)."""
    await require_admin(request)
    usage = request.app[pipeline_key].usage
    totals = await usage.today() if usage is not None else {}
    upstreams = request.app[routes_key].upstreams
    return _json({"usable": sum(u.keys.usable() for u in upstreams),
                  "keys": [{**row, "upstream": u.name, "tokens_today": totals.get(fp, {})}
                           for u in upstreams for row, fp in zip(u.keys.health(), u.keys.fingerprints())]})


async def get_upstreams(request: web.Request) -> web.Response:
    """Each upstream in routing order: host, models, pictures, health and its keys (masked)."""
    await require_admin(request)
    routes = request.app[routes_key]
    return _json({"upstreams": [u.status() for u in routes.upstreams], "default": routes.default,
                  "image": routes.image, "aliases": routes.aliases})


async def reset_quota(request: web.Request) -> web.Response:
    """Reset the daily quota of one identity (`{"identity": "1.2.3.4"}`) or of everyone (`{}`)."""
    await require_admin(request)
    identity = (await _body(request)).get("identity")
    if identity is not None and not isinstance(identity, str):
        raise _error(400, "identity: expected a string")
    if identity is not None:
        identity = identity_of_text(identity) or identity  # an IPv6 address counts as its /64
    pipeline = request.app[pipeline_key]
    try:
        cleared = await pipeline.quota.reset(identity) + await pipeline.debug_quota.reset(identity)
    except StoreUnavailable:
        raise _error(503, "The shared state (Redis) is unreachable: nothing was reset.") from None
    await _save(request.app)
    return _json({"reset": cleared, "identity": identity})


async def prune_images(request: web.Request) -> web.Response:
    """Run a picture-pruning pass now and say what it removed."""
    await require_admin(request)
    removed = await request.app[pruner_key].run_pass()
    return _json({"removed": removed})


def add_routes(app: web.Application) -> None:
    """Register `/admin/*`."""
    app.router.add_get("/admin/runtime", get_runtime)
    app.router.add_patch("/admin/runtime", patch_runtime)
    app.router.add_get("/admin/keys", get_keys)
    app.router.add_get("/admin/upstreams", get_upstreams)
    app.router.add_post("/admin/quota/reset", reset_quota)
    app.router.add_post("/admin/images/prune", prune_images)
