"""chatgpt-api: the app factory (wiring only) and the command line that starts it."""
from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from importlib import resources

from aiohttp import web

from chatgpt.faces import admin, curl, ops, wxlogin
from chatgpt.faces import miniprogram as views
from chatgpt.faces import v1 as openai_api
from chatgpt.faces.envelope import error_middleware
from chatgpt.keys import (
    admin_failures_key,
    flags_key,
    image_usage_key,
    inflight_key,
    memory_key,
    metrics_allow_key,
    metrics_key,
    moderation_key,
    page_key,
    pipeline_key,
    pruner_key,
    routes_key,
    session_key,
    settings_key,
    sockets_key,
    started_key,
    state_key,
    state_lock_key,
    store_key,
    local_store_key,
    trusted_key,
    upstream_key,
    wechat_login_key,
)
from chatgpt.domain.accounts import Accounts
from chatgpt.domain.gate import Gate
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.domain.upstreams import Upstreams
from chatgpt.server.clientip import TrustedProxies
from chatgpt.server.images import ImageStore, ImageUsage, Pruner
from chatgpt.server.inflight import InFlight
from chatgpt.domain.failover import Upstream, host_of
from chatgpt.domain.keypool import KeyPool, mask, probe_forever
from chatgpt.domain.failures import FailureLimit
from chatgpt.domain.limits import LimiterTable
from chatgpt.server.logs import quiet_bad_requests, setup_logging
from chatgpt.domain.memory import ConversationMemory
from chatgpt.domain.moderation import ContentCheck, Moderation
from chatgpt.domain.wordfilter import WordListError
from chatgpt.server.metrics import Metrics
from chatgpt.upstream.baixing import BaixingProvider
from chatgpt.upstream.offline import OfflineProvider
from chatgpt.upstream.openai import OpenAIProvider
from chatgpt.upstream.session import make_session
from chatgpt.upstream.wechat import WeChatClient
from chatgpt.domain.wxlogin import WeChatLogin
from chatgpt.domain.wxtoken import TokenSigner, secret_from_setting
from chatgpt.domain.quota import Quota
from chatgpt.domain.usage import TokenUsage
from chatgpt.server.routing import merge_slashes
from chatgpt.domain.routes import RouteTable
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.settings import Settings, SettingsError, load_settings, notes, replace_section
from chatgpt.server.state import StateFile, StateLock, StateLocked
from chatgpt.server.local_store import LocalStore
from chatgpt.server.redis_store import RedisStore, redacted
from chatgpt.faces.sockets import SocketRegistry
from chatgpt.faces.ws import close_sockets, websocket_handler

log = logging.getLogger("chatgpt")

SAVE_EVERY = 30.0  # seconds between state snapshots (only written when something changed)
WECHAT_SECRET = "wechat-token"  # the store's name of the WeChat token signing secret
ADMIN_FAILURES = 10  # wrong admin tokens per address per minute, then 429 (PROTOCOL.md E.3)
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
    store = app[store_key]
    live = [Upstream(e.name, e.base_url, e.models, e.images, e.usage, providers[e.name],
                     KeyPool(e.api_keys, store=store)) for e in settings.upstream_entries]
    routes = RouteTable(live, settings.default_model, settings.models.aliases, settings.models.image)
    offline = OfflineProvider() if settings.pool_provider == "offline" else None
    baixing = BaixingProvider(session, upstream.baixing_url, upstream.baixing_key, upstream.answer_timeout)
    images = ImageStore(settings.images.folder, settings.public_url, session,
                        int(settings.images.download_mb * 1024 * 1024), settings.images.download_seconds,
                        app[image_usage_key])
    flags, meter, limits = app[flags_key], app[metrics_key], settings.limits
    gate = Gate(flags, {"ws": LimiterTable(limits.ws_per_minute, 60.0),
                        **{door: LimiterTable(limits.http_per_second, 1.0) for door in ("http", "v1", "chat")}},
                meter)
    accounts = Accounts(flags, Quota(store, "quota", settings.quota.daily_questions),
                        Quota(store, "debug_quota", settings.quota.baixing_daily_questions), meter)
    upstreams = Upstreams(routes, offline, baixing, meter)
    app[session_key] = session
    app[routes_key] = routes
    app[upstream_key] = providers[routes.for_own_key(settings.default_model).name]
    app[pipeline_key] = ChatPipeline(settings, gate, accounts, upstreams, images, meter, TokenUsage(store),
                                     app[moderation_key])
    probes = [asyncio.create_task(probe_forever(u.keys, providers[u.name].key_works, every=60.0))
              for u in routes.upstreams if u.keys]
    yield
    for probe in probes:
        probe.cancel()
    for probe in probes:
        with suppress(asyncio.CancelledError):
            await probe
    await session.close()


async def wechat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The WeChat client on the upstream session (when wechat.appid is set), the login built on it, and
    WeChat's content check of logged-in users' prompts and answers (wechat.msg_sec_check)."""
    wechat = app[settings_key].wechat
    client = WeChatClient(app[session_key], appid=wechat.appid, secret=wechat.secret,
                          api_base=wechat.api_base) if wechat.appid else None
    # Every instance must verify the others' tokens: the setting, else a secret kept in the store (made
    # once, shared through Redis; in the state file for one instance).
    secret = (secret_from_setting(wechat.token_secret) if wechat.token_secret
              else bytes.fromhex(await app[store_key].secret(WECHAT_SECRET)))
    signer = TokenSigner(secret)
    app[wechat_login_key] = WeChatLogin(client, signer, wechat.session_days * 86400)
    if client is not None and wechat.msg_sec_check:
        app[moderation_key].wechat = ContentCheck(client, wechat.fail_open, app[metrics_key])
    yield
    app[moderation_key].wechat = None


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


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """With `state.redis_url`: connect to Redis (retried in the background while it is down)."""
    store = app[store_key]
    if not isinstance(store, RedisStore):
        yield
        return
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


async def end_http_streams(app: web.Application) -> None:
    """on_shutdown: streamed /v1 and /chat answers end with an error event, not a cut connection."""
    if stopped := app[inflight_key].stop_all():
        log.info("shutdown: ended %d streamed HTTP answer(s)", stopped)


def describe(settings: Settings) -> str:
    """One line saying where answers come from, without revealing any key."""
    names = ", ".join(e.name for e in settings.upstream_entries)
    if settings.pool_provider == "offline":
        return ("provider: offline (built-in, no network) — no upstream has a key, so anonymous questions "
                f"get a canned notice; users' own API keys still go to their upstream ({names})"
                + describe_state(settings))
    return f"provider: openai, upstreams {names}, default model {settings.default_model}" + describe_state(settings)


def describe_state(settings: Settings) -> str:
    """Where the shared state lives, for the start line (a Redis URL without its password)."""
    state = settings.state
    if not state.redis_url:
        return ""
    return f"; state: redis at {redacted(state.redis_url)} (redis_fail: {state.redis_fail})"


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
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.ws.max_message_bytes)
    app[settings_key] = settings
    app[metrics_key] = Metrics()
    local = app[local_store_key] = LocalStore()
    app[store_key] = (RedisStore(settings.state.redis_url, settings.state.redis_fail, local, metrics=app[metrics_key])
                      if settings.state.redis_url else local)
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
        web.run_app(create_app(settings), loop=loop, host=None if listener else settings.server.host,
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


def event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop the server runs on: uvloop (less CPU per event) when installed and not refused by
    `server.event_loop`, else asyncio's own."""
    if choice != "asyncio":
        try:
            # Imported by name: uvloop is optional (not a dependency), so the type check must not need it.
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("chatgpt-api: server.event_loop is uvloop but uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def check_listen(host: str, port: int) -> None:
    """Resolve `host` and bind each of its addresses as the server will (then let go); raise the
    OSError (or UnicodeError for a name IDNA cannot encode) that listening would meet."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def listen_failure(error: OSError | UnicodeError, host: str, port: int) -> str:
    """One line naming the setting that made listening fail, and why."""
    if isinstance(error, UnicodeError):
        return f"setting server.host: cannot resolve {host!r} (not a valid host name)"
    reason = error.strerror or str(error)
    if isinstance(error, socket.gaierror):
        return f"setting server.host: cannot resolve {host!r} ({reason})"
    if error.errno == errno.EADDRINUSE:
        return f"setting server.port: port {port} on {host} is already in use ({reason})"
    if error.errno == errno.EACCES:
        return f"setting server.port: not allowed to listen on port {port} ({reason})"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"setting server.host: {host} is not an address of this machine ({reason})"
    return f"settings server.host/server.port: cannot listen on {host}:{port} ({reason})"


if __name__ == "__main__":
    main()
