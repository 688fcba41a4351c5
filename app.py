"""chatgpt-api: the app factory (wiring only) and the command line that starts it."""
from __future__ import annotations

import argparse
import logging
import sys
import weakref
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from chatgpt import openai_api, views
from chatgpt.appkeys import flags_key, pipeline_key, session_key, settings_key, sockets_key, trusted_key, upstream_key
from chatgpt.chat import ChatPipeline
from chatgpt.clientip import TrustedProxies
from chatgpt.errors import error_middleware
from chatgpt.keypool import KeyPool, mask
from chatgpt.limits import LimiterTable
from chatgpt.providers.offline import OfflineProvider
from chatgpt.providers.openai import OpenAIProvider, make_session
from chatgpt.quota import DailyQuota
from chatgpt.routing import merge_slashes
from chatgpt.runtime import RuntimeFlags
from chatgpt.settings import Settings, SettingsError, load_settings, replace_section
from chatgpt.ws import close_sockets, websocket_handler

log = logging.getLogger("chatgpt")


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one upstream ClientSession and the pipeline built on it, closed on shutdown."""
    settings = app[settings_key]
    upstream = settings.upstream
    session = make_session(upstream.connect_timeout, upstream.read_timeout)
    openai = OpenAIProvider(session, upstream.base_url)
    pool_provider = openai if settings.pool_provider == "openai" else OfflineProvider()
    limiters = {"ws": LimiterTable(settings.limits.ws_per_minute, 60.0)}
    app[session_key] = session
    app[upstream_key] = openai
    app[pipeline_key] = ChatPipeline(settings, app[flags_key], KeyPool(upstream.api_keys),
                                     DailyQuota(settings.quota.daily_questions), limiters, pool_provider, openai)
    yield
    await session.close()


def describe(settings: Settings) -> str:
    """One line saying where answers come from, without revealing any key."""
    upstream = settings.upstream
    if settings.pool_provider == "offline":
        return ("provider: offline (built-in, no network) — no OPENAI_API_KEY is set, so anonymous "
                "questions get a canned notice; users' own API keys still go to " + upstream.base_url)
    keys = ", ".join(mask(k) for k in upstream.api_keys) or "none"
    return f"provider: openai at {upstream.base_url}, model {upstream.model}, server keys: {keys}"


def create_app(settings: Settings) -> web.Application:
    """Build the application; used alike by production, tests and `adev runserver`."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.ws.max_message_bytes)
    app[settings_key] = settings
    app[flags_key] = RuntimeFlags(settings.runtime, settings.quota.daily_questions)
    app[trusted_key] = TrustedProxies(settings.server.trusted_proxies)
    app[sockets_key] = weakref.WeakSet()
    merge_slashes(app, aliases={"/api1/": "/api/"})
    views.add_routes(app)
    app.router.add_get("/websocket", websocket_handler)
    openai_api.add_routes(app)
    app.cleanup_ctx.append(upstream_ctx)
    app.on_shutdown.append(close_sockets)
    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chatgpt-api", description=__doc__)
    parser.add_argument("--config", help="settings file (default: ./settings.yaml when present)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """`python app.py` / `chatgpt-api`: load settings, then serve until stopped."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    if args.check:
        print(f"settings OK; {describe(settings)}")
        return
    log.info("chatgpt-api starting on http://%s:%s; %s", settings.server.host, settings.server.port,
             describe(settings))
    web.run_app(create_app(settings), host=settings.server.host, port=settings.server.port,
                print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
