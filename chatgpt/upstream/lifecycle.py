"""The upstream side's lifecycles (cleanup contexts): the one ClientSession, a provider and key pool per
upstream, the pipeline built on them, each pool's re-probe task; then the WeChat client and login."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

from aiohttp import web

from chatgpt.domain.accounts import Accounts
from chatgpt.domain.failover import Upstream
from chatgpt.domain.gate import Gate
from chatgpt.domain.keypool import KeyPool, probe_forever
from chatgpt.domain.limits import LimiterTable
from chatgpt.domain.moderation import ContentCheck
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.domain.quota import Quota
from chatgpt.domain.routes import RouteTable
from chatgpt.domain.upstreams import Upstreams
from chatgpt.domain.usage import TokenUsage
from chatgpt.domain.wxlogin import WeChatLogin
from chatgpt.domain.wxtoken import TokenSigner, secret_from_setting
from chatgpt.keys import (
    flags_key,
    image_usage_key,
    metrics_key,
    moderation_key,
    pipeline_key,
    routes_key,
    session_key,
    settings_key,
    store_key,
    upstream_key,
    wechat_login_key,
)
from chatgpt.server.images import ImageStore
from chatgpt.upstream.baixing import BaixingProvider
from chatgpt.upstream.offline import OfflineProvider
from chatgpt.upstream.openai import OpenAIProvider
from chatgpt.upstream.session import make_session
from chatgpt.upstream.wechat import WeChatClient

WECHAT_SECRET = "wechat-token"  # the store's name of the WeChat token signing secret


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
