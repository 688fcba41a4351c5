"""The server side's lifecycles (cleanup contexts): the state file's lock, the Redis link, the state
snapshots, the picture pruner; and the shutdown step that ends streamed HTTP answers."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast
from contextlib import suppress

from aiohttp import web

from chatgpt.keys import (
    flags_key,
    image_usage_key,
    inflight_key,
    local_store_key,
    pruner_key,
    routes_key,
    settings_key,
    state_key,
    state_lock_key,
    store_key,
)
from chatgpt.server.images import Pruner
from chatgpt.server.state import StateFile, StateLock

if TYPE_CHECKING:
    from chatgpt.server.redis_store import RedisStore

# The logger these lines were always written under (they came from app.py): operators' filters keep working.
log = logging.getLogger("chatgpt")

SAVE_EVERY = 30.0  # seconds between state snapshots (only written when something changed)


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """With `state.redis_url`: connect to Redis (retried in the background while it is down)."""
    if not app[settings_key].state.redis_url:
        yield
        return
    store = cast("RedisStore", app[store_key])  # create_app made it (redis-py is imported only then)
    await store.start()
    yield
    await store.close()


async def state_lock_ctx(app: web.Application) -> AsyncIterator[None]:
    """First of all: hold the state file's lock, so a second process on the same file stops before it
    touches anything (PROTOCOL.md E.3). Not with Redis: the state file is not used, and instances may
    share a folder and a settings file."""
    if app[settings_key].state.redis_url:
        yield
        return
    lock = StateLock(app[settings_key].state.file)
    lock.acquire()
    app[state_lock_key] = lock
    yield
    lock.release()


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    """Restore quotas, flags and key health at start; save periodically and at shutdown.
    Not used when the state is shared through Redis (instances must not each keep their own)."""
    if app[settings_key].state.redis_url:
        yield
        return
    local = app[local_store_key]
    # Key health per upstream: "keys" for the one of the `upstream:` shorthand (as before), "keys.<name>" else.
    pools = {"keys" if u.name == "default" else f"keys.{u.name}": u.keys for u in app[routes_key].upstreams}
    state = StateFile(app[settings_key].state.file, {
        "flags": app[flags_key], "quota": local.counter("quota"), "debug_quota": local.counter("debug_quota"),
        **pools, "chat": local.conversations, "usage": local.usage, "secrets": local.secrets})
    state.load(app[state_lock_key])
    app[state_key] = state
    saver = asyncio.create_task(state.save_periodically(SAVE_EVERY))
    yield
    saver.cancel()
    with suppress(asyncio.CancelledError):
        await saver
    try:
        state.save_now()
    except OSError as exc:
        log.error("state file %s not written at shutdown (%s)", state.path, exc.strerror)


async def pruner_ctx(app: web.Application) -> AsyncIterator[None]:
    """The picture-pruning task: daily at images.prune_at and whenever the folder is over its cap."""
    images = app[settings_key].images
    pruner = Pruner(images.folder, images.retention_hours * 3600, int(images.max_total_mb * 1024 * 1024),
                    images.prune_at, usage=app[image_usage_key])
    app[pruner_key] = pruner
    await pruner.measure()  # the one folder scan; from here on saves and passes keep the count
    task = asyncio.create_task(pruner.run_forever())
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


async def end_http_streams(app: web.Application) -> None:
    """on_shutdown: streamed /v1 and /chat answers end with an error event, not a cut connection."""
    if stopped := app[inflight_key].stop_all():
        log.info("shutdown: ended %d streamed HTTP answer(s)", stopped)
