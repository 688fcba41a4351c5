"""Every piece of typed app state, as `web.AppKey`s: no string keys, no module globals."""
from __future__ import annotations

import weakref

import aiohttp
from aiohttp import web

from .chat import ChatPipeline
from .clientip import TrustedProxies
from .images import Pruner
from .inflight import InFlight
from .limits import LimiterTable
from .memory import ConversationMemory
from .metrics import Metrics
from .providers.openai import OpenAIProvider
from .runtime import RuntimeFlags
from .settings import Settings
from .state import StateFile

settings_key = web.AppKey("settings", Settings)
flags_key = web.AppKey("flags", RuntimeFlags)
session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", OpenAIProvider)
pipeline_key = web.AppKey("pipeline", ChatPipeline)
sockets_key = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
trusted_key = web.AppKey("trusted_proxies", TrustedProxies)
http_limits_key = web.AppKey("http_limits", dict[str, LimiterTable])
state_key = web.AppKey("state", StateFile)
pruner_key = web.AppKey("pruner", Pruner)
memory_key = web.AppKey("memory", ConversationMemory)
metrics_key = web.AppKey("metrics", Metrics)
page_key = web.AppKey("page", bytes)
started_key = web.AppKey("started", float)
inflight_key = web.AppKey("inflight", InFlight)
