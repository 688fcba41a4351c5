"""chatgpt-api: the app factory (wiring only) and the command line that starts it."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from importlib import resources

from aiohttp import web

from chatgpt.faces import admin
from chatgpt.faces import v1 as openai_api
from chatgpt.faces import ops
from chatgpt.faces import wxlogin
from chatgpt.faces import miniprogram as views
from chatgpt.keys import (
    flags_key,
    http_limits_key,
    inflight_key,
    memory_key,
    metrics_key,
    page_key,
    pipeline_key,
    pruner_key,
    routes_key,
    session_key,
    settings_key,
    sockets_key,
    started_key,
    state_key,
    trusted_key,
    upstream_key,
    wechat_login_key,
)
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.server.clientip import TrustedProxies
from chatgpt.server.errors import error_middleware
from chatgpt.server.guards import rate_limit_middleware
from chatgpt.server.images import ImageStore, Pruner
from chatgpt.server.inflight import InFlight
from chatgpt.domain.failover import Upstream, host_of
from chatgpt.domain.keypool import KeyPool, mask, probe_forever
from chatgpt.domain.limits import LimiterTable
from chatgpt.server.logs import quiet_bad_requests, setup_logging
from chatgpt.domain.memory import ConversationMemory
from chatgpt.server.metrics import Metrics
from chatgpt.upstream.baixing import BaixingProvider
from chatgpt.upstream.offline import OfflineProvider
from chatgpt.upstream.openai import OpenAIProvider
from chatgpt.upstream.session import make_session
from chatgpt.upstream.wechat import WeChatClient
from chatgpt.domain.wxlogin import WeChatLogin
from chatgpt.domain.wxtoken import TokenSigner, secret_from_setting
from chatgpt.domain.quota import DailyQuota
from chatgpt.server.routing import merge_slashes
from chatgpt.domain.routes import RouteTable
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.settings import Settings, SettingsError, load_settings, notes, replace_section
from chatgpt.server.state import StateFile
from chatgpt.faces.ws import close_sockets, websocket_handler

log = logging.getLogger("chatgpt")

SAVE_EVERY = 30.0  # seconds between state snapshots (only written when something changed)
SHUTDOWN_SECONDS = 5.0  # in-flight requests get this long at SIGTERM; systemd waits 15 s


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one upstream ClientSession, one provider and key pool per upstream, the pipeline built on
    them and each pool's key re-probe task."""
    settings = app[settings_key]
    upstream = settings.upstream
    session = make_session(upstream.connect_timeout)
    providers = {e.name: OpenAIProvider(session, e.base_url, read_timeout=upstream.read_timeout,
                                        answer_timeout=upstream.answer_timeout, usage=e.usage)
                 for e in settings.upstream_entries}
    upstreams = [Upstream(e.name, e.base_url, e.models, e.images, e.usage, providers[e.name], KeyPool(e.api_keys))
                 for e in settings.upstream_entries]
    routes = RouteTable(upstreams, settings.default_model, settings.models.aliases, settings.models.image)
    offline = OfflineProvider() if settings.pool_provider == "offline" else None
    baixing = BaixingProvider(session, upstream.baixing_url, upstream.baixing_key, upstream.answer_timeout)
    images = ImageStore(settings.images.folder, settings.public_url, session,
                        int(settings.images.download_mb * 1024 * 1024), settings.images.download_seconds)
    app[session_key] = session
    app[routes_key] = routes
    app[upstream_key] = providers[routes.for_own_key(settings.default_model).name]
    app[pipeline_key] = ChatPipeline(
        settings, app[flags_key], routes, DailyQuota(settings.quota.daily_questions),
        DailyQuota(settings.quota.baixing_daily_questions),
        {"ws": LimiterTable(settings.limits.ws_per_minute, 60.0)}, offline, baixing, images, app[metrics_key])
    probes = [asyncio.create_task(probe_forever(u.keys, providers[u.name].key_works, every=60.0))
              for u in upstreams if u.keys]
    yield
    for probe in probes:
        probe.cancel()
    for probe in probes:
        with suppress(asyncio.CancelledError):
            await probe
    await session.close()


async def wechat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The WeChat client on the upstream session (when wechat.appid is set) and the login built on it."""
    wechat = app[settings_key].wechat
    client = WeChatClient(app[session_key], appid=wechat.appid, secret=wechat.secret,
                          api_base=wechat.api_base) if wechat.appid else None
    signer = TokenSigner(secret_from_setting(wechat.token_secret))
    app[wechat_login_key] = WeChatLogin(client, signer, wechat.session_days * 86400)
    yield


async def pruner_ctx(app: web.Application) -> AsyncIterator[None]:
    """The picture-pruning task: daily at images.prune_at and whenever the folder is over its cap."""
    images = app[settings_key].images
    pruner = Pruner(images.folder, images.retention_hours * 3600, int(images.max_total_mb * 1024 * 1024),
                    images.prune_at)
    app[pruner_key] = pruner
    task = asyncio.create_task(pruner.run_forever())
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    """Restore quotas, flags and key health at start; save periodically and at shutdown."""
    pipeline = app[pipeline_key]
    # Key health per upstream: "keys" for the one of the `upstream:` shorthand (as before), "keys.<name>" else.
    pools = {"keys" if u.name == "default" else f"keys.{u.name}": u.keys for u in app[routes_key].upstreams}
    state = StateFile(app[settings_key].state.file, {
        "flags": app[flags_key], "quota": pipeline.quota, "debug_quota": pipeline.debug_quota,
        **pools, "chat": app[memory_key]})
    state.load()
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


async def end_http_streams(app: web.Application) -> None:
    """on_shutdown: streamed /v1 and /chat answers end with an error event, not a cut connection."""
    if stopped := app[inflight_key].stop_all():
        log.info("shutdown: ended %d streamed HTTP answer(s)", stopped)


def describe(settings: Settings) -> str:
    """One line saying where answers come from, without revealing any key."""
    names = ", ".join(e.name for e in settings.upstream_entries)
    if settings.pool_provider == "offline":
        return ("provider: offline (built-in, no network) — no upstream has a key, so anonymous questions "
                f"get a canned notice; users' own API keys still go to their upstream ({names})")
    return f"provider: openai, upstreams {names}, default model {settings.default_model}"


def describe_routes(settings: Settings) -> list[str]:
    """Which upstream serves what, with masked keys: one line per upstream, one for the models."""
    lines = []
    for e in settings.upstream_entries:
        keys = ", ".join(mask(k) for k in e.api_keys) or (f"none ({e.api_keys_env} unset)" if e.api_keys_env
                                                            else "none")
        draws = "; draws pictures" if e.images else ""
        lines.append(f"upstream {e.name} at {host_of(e.base_url)} serves {', '.join(e.models)}{draws}; "
                     f"keys: {keys}")
    models = settings.models
    aliases = ", ".join(f"{a} -> {t}" for a, t in models.aliases.items()) or "none"
    lines.append(f"models: default {settings.default_model}, pictures "
                 f"{models.image or '(the upstream default)'}, aliases {aliases}")
    return lines


def create_app(settings: Settings) -> web.Application:
    """Build the application; used alike by production, tests and `adev runserver`."""
    quiet_bad_requests()
    app = web.Application(middlewares=[error_middleware, rate_limit_middleware],
                          client_max_size=settings.ws.max_message_bytes)
    app[settings_key] = settings
    app[flags_key] = RuntimeFlags(settings.runtime, settings.quota.daily_questions)
    app[trusted_key] = TrustedProxies(settings.server.trusted_proxies)
    app[sockets_key] = weakref.WeakSet()
    app[metrics_key] = Metrics()
    app[started_key] = time.monotonic()
    app[inflight_key] = InFlight()
    app[page_key] = resources.files("chatgpt").joinpath("web/index.html").read_bytes()
    chat = settings.chat
    app[memory_key] = ConversationMemory(chat.max_conversations, chat.max_turns, chat.ttl_hours * 3600)
    app[http_limits_key] = {"http": LimiterTable(settings.limits.http_per_second, 1.0),
                            "v1": LimiterTable(settings.limits.http_per_second, 1.0)}
    merge_slashes(app, aliases={"/api1/": "/api/"})
    views.add_routes(app)
    app.router.add_get("/websocket", websocket_handler)
    openai_api.add_routes(app)
    admin.add_routes(app)
    ops.add_routes(app)
    wxlogin.add_routes(app)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(wechat_ctx)  # after upstream_ctx: it uses its session
    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(pruner_ctx)
    app.on_shutdown.append(close_sockets)
    app.on_shutdown.append(end_http_streams)
    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chatgpt-api", description=__doc__)
    parser.add_argument("--config", help="settings file (default: ./settings.yaml when present)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    parser.add_argument("--log-format", choices=("text", "json"), help="overrides logging.format")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """`python app.py` / `chatgpt-api`: load settings, then serve until stopped."""
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.host or args.port:
            settings = replace_section(settings, "server", host=args.host or settings.server.host,
                                       port=args.port or settings.server.port)
            if not 0 < settings.server.port < 65536:
                raise SettingsError("setting server.port: expected 1..65535")
        TrustedProxies(settings.server.trusted_proxies)
    except (SettingsError, ValueError) as error:
        print(f"chatgpt-api: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.logging.level, args.log_format or settings.logging.format)
    if args.check:
        print(f"settings OK; {describe(settings)}")
        for line in describe_routes(settings):
            print(f"  {line}")
        for line in notes(settings):
            print(f"  warning: {line}")
        return
    log.info("chatgpt-api starting on http://%s:%s; %s", settings.server.host, settings.server.port,
             describe(settings))
    for line in describe_routes(settings):
        log.info("%s", line)
    for line in notes(settings):
        log.warning("%s", line)
    web.run_app(create_app(settings), host=settings.server.host, port=settings.server.port,
                print=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS)


if __name__ == "__main__":
    main()
