"""`/admin/*`: runtime flags, key health and quota resets for the operator, behind a bearer token."""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.keys import flags_key, pipeline_key, pruner_key, routes_key, settings_key, state_key
from chatgpt.server.bodies import read_raw

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=jsontext.dumps)


def _error(status: int, message: str) -> web.HTTPException:
    """An admin failure as JSON with a real HTTP status."""
    text = json.dumps({"error": {"message": message, "type": "admin_error", "param": None, "code": None}})
    kinds: dict[int, type[web.HTTPException]] = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized,
                                                  404: web.HTTPNotFound}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return kinds[status](text=text, content_type="application/json", headers=headers)


def require_admin(request: web.Request) -> None:
    """401 unless the bearer token matches (constant-time); 404 when no token is configured."""
    token = request.app[settings_key].admin.token
    if not token:
        raise _error(404, "The admin API is off: set admin.token or CHATGPT_ADMIN_TOKEN.")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _error(401, "A valid admin bearer token is required.")


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
    require_admin(request)
    return _json(request.app[flags_key].as_dict())


async def patch_runtime(request: web.Request) -> web.Response:
    """Change some flags at once (all checked before any is applied); saved to the state file."""
    require_admin(request)
    try:
        flags = request.app[flags_key].update(await _body(request))
    except ValueError as error:
        raise _error(400, str(error)) from None
    await request.app[state_key].save()
    log.info("runtime flags changed by the admin API: %s", ", ".join(sorted(flags)))
    return _json(flags)


async def get_keys(request: web.Request) -> web.Response:
    """Health of each server key, masked to its last 4 characters, with the upstream it belongs to."""
    require_admin(request)
    upstreams = request.app[routes_key].upstreams
    return _json({"usable": sum(u.keys.usable() for u in upstreams),
                  "keys": [{**row, "upstream": u.name} for u in upstreams for row in u.keys.health()]})


async def get_upstreams(request: web.Request) -> web.Response:
    """Each upstream in routing order: host, models, pictures, health and its keys (masked)."""
    require_admin(request)
    routes = request.app[routes_key]
    return _json({"upstreams": [u.status() for u in routes.upstreams], "default": routes.default,
                  "image": routes.image, "aliases": routes.aliases})


async def reset_quota(request: web.Request) -> web.Response:
    """Reset the daily quota of one identity (`{"identity": "1.2.3.4"}`) or of everyone (`{}`)."""
    require_admin(request)
    identity = (await _body(request)).get("identity")
    if identity is not None and not isinstance(identity, str):
        raise _error(400, "identity: expected a string")
    pipeline = request.app[pipeline_key]
    cleared = pipeline.quota.reset(identity) + pipeline.debug_quota.reset(identity)
    await request.app[state_key].save()
    return _json({"reset": cleared, "identity": identity})


async def prune_images(request: web.Request) -> web.Response:
    """Run a picture-pruning pass now and say what it removed."""
    require_admin(request)
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
