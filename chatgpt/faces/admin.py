"""`/admin/*`: runtime flags, key health and quota resets for the operator, behind a bearer token; a
sub-application whose failures are JSON with real HTTP statuses."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain.store import StoreUnavailable
from chatgpt.domain.wordfilter import WordListError
from chatgpt.keys import (admin_failures_key, flags_key, moderation_key, pipeline_key, pruner_key, routes_key,
                          settings_key, state_key)
from chatgpt.server.bodies import BadBody, read_object
from chatgpt.server.clientip import identity_of_text
from chatgpt.server.failures import answer_failures
from chatgpt.server.guards import Handler, identity_of

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
    token = request.config_dict[settings_key].admin.token
    if not token:
        raise _error(404, "The admin API is off: set admin.token or CHATGPT_ADMIN_TOKEN.")
    address = identity_of(request)
    failures = request.config_dict[admin_failures_key]
    wait = await failures.retry_after(address)
    if wait > 0:
        raise _error(429, "Too many wrong admin tokens from this address: try again later.", wait)
    if not token_matches(request.headers.get("Authorization", ""), token):
        await failures.record(address)
        if await failures.retry_after(address) > 0:
            log.warning("admin API: %d wrong tokens from %s within %.0f s; refusing it for a while",
                        failures.max_failures, address, failures.window)
        raise _error(401, "A valid admin bearer token is required.")


async def _save(request: web.Request) -> None:
    """Write the state file now (there is none when the state is shared through Redis)."""
    state = request.config_dict.get(state_key)
    if state is not None:
        await state.save()


async def _body(request: web.Request) -> dict[str, Any]:
    return await read_object(request, blank={})


def _json_error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "admin_error", "param": None, "code": None}}
    return web.json_response(body, status=status, dumps=jsontext.dumps)


BODY_FAULTS = {"too_slow": (408, "Request body not received in time."), "too_large": (413, "Request body too large.")}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin table: a bad body is a 400 (408, 413), anything unexpected a 500, all as admin JSON."""
    return await answer_failures(request, handler, _bad_body,
                                 lambda exc: _json_error(500, "The server failed unexpectedly; the failure is logged."))


def _bad_body(exc: Exception) -> web.Response | None:
    if not isinstance(exc, BadBody):
        return None
    return _json_error(*BODY_FAULTS.get(exc.fault, (400, "The body must be a JSON object.")))


async def get_runtime(request: web.Request) -> web.Response:
    """The current runtime flags."""
    await require_admin(request)
    return _json(request.config_dict[flags_key].as_dict())


async def patch_runtime(request: web.Request) -> web.Response:
    """Change some flags at once (all checked before any is applied); saved to the state file."""
    await require_admin(request)
    try:
        flags = await request.config_dict[flags_key].change(await _body(request))
    except ValueError as error:
        raise _error(400, str(error)) from None
    await _save(request)
    log.info("runtime flags changed by the admin API: %s", ", ".join(sorted(flags)))
    return _json(flags)


async def get_keys(request: web.Request) -> web.Response:
    """Health of each server key, masked to its last 4 characters, with the upstream it belongs to and
    its tokens today per model (summed over every instance when the state is shared)."""
    await require_admin(request)
    usage = request.config_dict[pipeline_key].usage
    totals = await usage.today() if usage is not None else {}
    upstreams = request.config_dict[routes_key].upstreams
    return _json({"usable": sum(u.keys.usable() for u in upstreams),
                  "keys": [{**row, "upstream": u.name, "tokens_today": totals.get(fp, {})}
                           for u in upstreams for row, fp in zip(u.keys.health(), u.keys.fingerprints())]})


async def get_upstreams(request: web.Request) -> web.Response:
    """Each upstream in routing order: host, models, pictures, health and its keys (masked)."""
    await require_admin(request)
    routes = request.config_dict[routes_key]
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
    try:
        cleared = await request.config_dict[pipeline_key].reset_quota(identity)
    except StoreUnavailable:
        raise _error(503, "The shared state (Redis) is unreachable: nothing was reset.") from None
    await _save(request)
    return _json({"reset": cleared, "identity": identity})


async def prune_images(request: web.Request) -> web.Response:
    """Run a picture-pruning pass now and say what it removed."""
    await require_admin(request)
    removed = await request.config_dict[pruner_key].run_pass()
    return _json({"removed": removed})


async def reload_words(request: web.Request) -> web.Response:
    """Read `moderation.words_file` again; answer how many words it lists. A file that cannot be read is
    a 400 naming why, and the list in use stays."""
    await require_admin(request)
    if not request.config_dict[settings_key].moderation.words_file:
        raise _error(400, "No words file is configured: set moderation.words_file.")
    moderation = request.config_dict[moderation_key]
    try:
        count = await asyncio.to_thread(moderation.reload)  # a long list takes a while to build
    except WordListError as error:
        log.warning("sensitive words not reloaded, the %d in use stay: %s", moderation.words.size, error)
        raise _error(400, f"{error}; the {moderation.words.size} words in use stay") from None
    log.info("sensitive words reloaded by the admin API: %d words", count)
    return _json({"words": count})


def make_app() -> web.Application:
    """The `/admin` sub-application (mounted with `app.add_subapp("/admin", ...)`)."""
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/runtime", get_runtime)
    app.router.add_patch("/runtime", patch_runtime)
    app.router.add_get("/keys", get_keys)
    app.router.add_get("/upstreams", get_upstreams)
    app.router.add_post("/quota/reset", reset_quota)
    app.router.add_post("/images/prune", prune_images)
    app.router.add_post("/words/reload", reload_words)
    return app
