"""Every piece of typed app state, as `web.AppKey`s: no string keys, no module globals."""
from __future__ import annotations

import aiohttp
from aiohttp import web

from chatgpt.domain.failover import Upstream
from chatgpt.domain.pipeline import ChatPipeline
from chatgpt.faces.sockets import SocketRegistry
from chatgpt.domain.routes import RouteTable
from chatgpt.server.clientip import TrustedProxies
from chatgpt.server.images import ImageUsage, Pruner
from chatgpt.server.inflight import InFlight
from chatgpt.domain.failures import FailureLimit
from chatgpt.domain.store import Store
from chatgpt.server.local_store import LocalStore
from chatgpt.domain.memory import ConversationMemory
from chatgpt.domain.moderation import Moderation
from chatgpt.server.metrics import Metrics
from chatgpt.upstream.openai import OpenAIProvider
from chatgpt.domain.runtime import RuntimeFlags
from chatgpt.domain.wxlogin import WeChatLogin
from chatgpt.settings import Settings
from chatgpt.server.state import StateFile, StateLock

settings_key = web.AppKey("settings", Settings)
flags_key = web.AppKey("flags", RuntimeFlags)
session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", OpenAIProvider)  # checks a mini-program user's key (/api/auth/apikey/verify)
routes_key = web.AppKey("routes", RouteTable[Upstream])  # every upstream with its provider and key pool
pipeline_key = web.AppKey("pipeline", ChatPipeline)
sockets_key = web.AppKey("sockets", SocketRegistry)
trusted_key = web.AppKey("trusted_proxies", TrustedProxies)
metrics_allow_key = web.AppKey("metrics_allow", TrustedProxies)  # peers that may read /metrics
image_usage_key = web.AppKey("image_usage", ImageUsage)
state_key = web.AppKey("state", StateFile)
state_lock_key = web.AppKey("state_lock", StateLock)
pruner_key = web.AppKey("pruner", Pruner)
memory_key = web.AppKey("memory", ConversationMemory)
metrics_key = web.AppKey("metrics", Metrics)
page_key = web.AppKey("page", bytes)
started_key = web.AppKey("started", float)
inflight_key = web.AppKey("inflight", InFlight)
store_key = web.AppKey("store", Store)  # the shared state: LocalStore, or RedisStore with state.redis_url
local_store_key = web.AppKey("local_store", LocalStore)  # the in-process store (state file; Redis fallback)
admin_failures_key = web.AppKey("admin_failures", FailureLimit)  # wrong admin tokens per address (in the store)
wechat_login_key = web.AppKey("wechat_login", WeChatLogin)
moderation_key = web.AppKey("moderation", Moderation)  # the word list (reloadable) and WeChat's content check
