"""chatgpt-api: the app factory (wiring only) and the command line that starts it."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from collections.abc import Sequence
from importlib import resources

from aiohttp import web

from chatgpt.domain.failures import FailureLimit
from chatgpt.domain.memory import ConversationMemory
from chatgpt.domain.moderation import Moderation
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.domain.wordfilter import WordListError
from chatgpt.faces import admin, curl, ops, wxlogin
from chatgpt.faces import miniprogram as views
from chatgpt.faces import v1 as openai_api
from chatgpt.faces.envelope import error_middleware
from chatgpt.faces.sockets import SocketRegistry
from chatgpt.faces.ws import close_sockets, websocket_handler
from chatgpt.keys import (
    admin_failures_key,
    flags_key,
    image_usage_key,
    inflight_key,
    local_store_key,
    memory_key,
    metrics_allow_key,
    metrics_key,
    moderation_key,
    page_key,
    settings_key,
    sockets_key,
    started_key,
    store_key,
    trusted_key,
)
from chatgpt.server.banner import describe, describe_routes
from chatgpt.server.clientip import TrustedProxies
from chatgpt.server.images import ImageUsage
from chatgpt.server.inflight import InFlight
from chatgpt.server.lifecycle import end_http_streams, pruner_ctx, state_ctx, state_lock_ctx, store_ctx
from chatgpt.server.heap import freeze_startup_heap
from chatgpt.server.listener import check_listen, event_loop, listen_failure
from chatgpt.server.local_store import LocalStore
from chatgpt.server.logs import quiet_bad_requests, setup_logging
from chatgpt.server.metrics import Metrics
from chatgpt.server.routing import merge_slashes
from chatgpt.server.state import StateLock, StateLocked
from chatgpt.settings import Settings, SettingsError, load_settings, notes, replace_section
from chatgpt.upstream.lifecycle import upstream_ctx, wechat_ctx

log = logging.getLogger("chatgpt")

ADMIN_FAILURES = 10  # wrong admin tokens per address per minute, then 429 (PROTOCOL.md E.3)
SHUTDOWN_SECONDS = 5.0  # in-flight requests get this long at SIGTERM; systemd waits 15 s


def create_app(settings: Settings) -> web.Application:
    """Build the application; used alike by production, tests and `adev runserver`."""
    quiet_bad_requests()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.ws.max_message_bytes)
    app[settings_key] = settings
    app[metrics_key] = Metrics()
    local = app[local_store_key] = LocalStore()
    if settings.state.redis_url:
        # Imported only when configured: redis-py adds ~8 MB to a process that does not use it.
        from chatgpt.server.redis_store import RedisStore
        app[store_key] = RedisStore(settings.state.redis_url, settings.state.redis_fail, local, metrics=app[metrics_key])
    else:
        app[store_key] = local
    app[flags_key] = RuntimeFlags(settings.runtime, settings.quota.daily_questions, app[store_key])
    app[trusted_key] = TrustedProxies(settings.server.trusted_proxies)
    app[metrics_allow_key] = TrustedProxies(settings.ops.metrics_allow)  # an address set, like the proxies
    app[sockets_key] = SocketRegistry(settings.ws.max_sockets_per_ip, settings.ws.max_sockets)
    app[image_usage_key] = ImageUsage(app[metrics_key].set_images)
    app[started_key] = time.monotonic()
    app[inflight_key] = InFlight()
    app[admin_failures_key] = FailureLimit(app[store_key], "admin", ADMIN_FAILURES, 60.0)
    app[page_key] = resources.files("chatgpt").joinpath("web/index.html").read_bytes()
    # The word list is read here, so a bad words file stops the start (main() says so in one line).
    app[moderation_key] = Moderation.configured(settings.moderation.words_file, settings.moderation.action)
    chat = settings.chat
    app[memory_key] = ConversationMemory(app[store_key], chat.max_conversations, chat.max_turns,
                                         chat.ttl_hours * 3600, settings.upstream.context_chars)
    merge_slashes(app, aliases={"/api1/": "/api/"})
    views.add_routes(app)
    curl.add_routes(app)
    app.router.add_get("/websocket", websocket_handler)
    app.add_subapp("/v1", openai_api.make_app())
    app.add_subapp("/admin", admin.make_app())
    ops.add_routes(app)
    wxlogin.add_routes(app)
    app.cleanup_ctx.append(state_lock_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(wechat_ctx)  # after upstream_ctx (its session) and the state (the token secret)
    app.cleanup_ctx.append(pruner_ctx)
    app.on_shutdown.append(close_sockets)
    app.on_shutdown.append(end_http_streams)
    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chatgpt-api", description=__doc__)
    parser.add_argument("--config", help="settings file (default: ./settings.yaml when present)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int,
                        help="port to listen on (overrides server.port; 0: any free port, named in the log)")
    parser.add_argument("--check", action="store_true", help="validate the settings and exit")
    parser.add_argument("--log-format", choices=("text", "json"), help="overrides logging.format")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """`python app.py` / `chatgpt-api`: load settings, then serve until stopped."""
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.host or args.port is not None:
            settings = replace_section(settings, "server", host=args.host or settings.server.host,
                                       port=settings.server.port if args.port is None else args.port)
            if not 0 <= settings.server.port < 65536:
                raise SettingsError("setting server.port: expected 1..65535")
        TrustedProxies(settings.server.trusted_proxies)
        words = Moderation.configured(settings.moderation.words_file, settings.moderation.action).words
    except (SettingsError, ValueError) as error:
        print(f"chatgpt-api: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except WordListError as error:
        print(f"chatgpt-api: setting moderation.words_file: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.logging.level, args.log_format or settings.logging.format)
    if args.check:
        print(f"settings OK; {describe(settings)}")
        if settings.moderation.words_file:
            print(f"  moderation: {words.size} listed words, action {settings.moderation.action}")
        for line in describe_routes(settings):
            print(f"  {line}")
        for line in notes(settings):
            print(f"  warning: {line}")
        return
    listener = None
    try:
        # Before anything is logged or the state file touched: a second instance, a busy port or a bad
        # host ends in one line naming what to change (run_app would fail the same way, later).
        if not settings.state.redis_url:  # with Redis there is no state file to share
            probe = StateLock(settings.state.file)  # first: the same instance started twice says so
            probe.acquire()
            probe.release()
        if settings.server.port == 0:
            # `--port 0` (tests): bind here so the log line below names the port the OS picked; nobody can
            # take it between choosing and binding, as with a port picked first and bound later.
            host = settings.server.host
            listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            settings = replace_section(settings, "server", port=listener.getsockname()[1])
        else:
            check_listen(settings.server.host, settings.server.port)
    except StateLocked as error:
        print(f"chatgpt-api: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, UnicodeError) as error:
        print(f"chatgpt-api: {listen_failure(error, settings.server.host, settings.server.port)}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("chatgpt-api starting on http://%s:%s; %s", settings.server.host, settings.server.port,
             describe(settings))
    for line in describe_routes(settings):
        log.info("%s", line)
    if settings.moderation.words_file:
        log.info("moderation: %d listed words, action %s", words.size, settings.moderation.action)
    for line in notes(settings):
        log.warning("%s", line)
    loop = event_loop(settings.server.event_loop)
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    try:
        app = create_app(settings)
        app.on_startup.append(freeze_startup_heap)  # the serving process only: tests build many apps in one
        web.run_app(app, loop=loop, host=None if listener else settings.server.host,
                    port=None if listener else settings.server.port, sock=listener, print=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS)
    except StateLocked as error:
        print(f"chatgpt-api: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except WordListError as error:  # the file changed since the check above
        print(f"chatgpt-api: setting moderation.words_file: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, UnicodeError) as error:  # UnicodeError: a host name IDNA cannot encode ("a..b")
        print(f"chatgpt-api: {listen_failure(error, settings.server.host, settings.server.port)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
