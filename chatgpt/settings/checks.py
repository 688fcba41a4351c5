"""Checks a type alone cannot express (ranges, formats), and start-up notes on settings that load
but probably do not do what was meant."""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from chatgpt.settings.errors import SettingsError
from chatgpt.settings.root import Settings

MIN_ADMIN_TOKEN = 16  # characters; a shorter token falls to guessing even at 10 tries a minute


def _networks_ok(entries: tuple[str, ...]) -> bool:
    """Every entry is an IP address or a CIDR network."""
    try:
        for entry in entries:
            ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return False
    return True


_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_SIZE = re.compile(r"^\d{2,4}x\d{2,4}$")


def validate(settings: Settings) -> Settings:
    """Range and format checks that a type alone cannot express."""
    s, u = settings.server, settings.upstream
    checks: list[tuple[bool, str]] = [
        (0 < s.port < 65536, "server.port: expected 1..65535"),
        (not s.public_url or s.public_url.startswith(("http://", "https://")),
         "server.public_url: expected an http:// or https:// URL"),
        (u.provider in ("auto", "openai", "offline"), "upstream.provider: expected auto, openai or offline"),
        (u.base_url.startswith(("http://", "https://")), "upstream.base_url: expected an http:// or https:// URL"),
        (u.baixing_url.startswith(("http://", "https://")), "upstream.baixing_url: expected an http(s) URL"),
        (bool(u.model.strip()), "upstream.model: must not be empty"),
        (0 <= u.temperature <= 2, "upstream.temperature: expected 0..2"),
        (u.max_tokens > 0, "upstream.max_tokens: expected a positive integer"),
        (u.context_chars > 0, "upstream.context_chars: expected a positive integer"),
        (u.connect_timeout > 0, "upstream.connect_timeout: expected a positive number"),
        (u.read_timeout > 0, "upstream.read_timeout: expected a positive number"),
        (u.answer_timeout > 0, "upstream.answer_timeout: expected a positive number"),
        (settings.ws.reasoning in ("live", "hide"), "ws.reasoning: expected live or hide"),
        (settings.server.event_loop in ("auto", "uvloop", "asyncio"), "server.event_loop: expected auto, uvloop or asyncio"),
        (settings.limits.http_per_second > 0, "limits.http_per_second: expected a positive number"),
        (settings.limits.ws_per_minute > 0, "limits.ws_per_minute: expected a positive number"),
        (settings.quota.daily_questions >= 0, "quota.daily_questions: expected 0 or more"),
        (settings.quota.baixing_daily_questions >= 0, "quota.baixing_daily_questions: expected 0 or more"),
        (1024 <= settings.ws.max_message_bytes <= 64 * 1048576, "ws.max_message_bytes: expected 1024..67108864"),
        (0 <= settings.ws.frame_interval_ms <= 10000, "ws.frame_interval_ms: expected 0..10000"),
        (0 <= settings.server.stream_interval_ms <= 1000, "server.stream_interval_ms: expected 0..1000"),
        (settings.ws.bytes_per_second >= 0, "ws.bytes_per_second: expected 0 or more"),
        (settings.ws.burst_bytes >= 0, "ws.burst_bytes: expected 0 or more"),
        (settings.ws.max_sockets_per_ip > 0, "ws.max_sockets_per_ip: expected a positive integer"),
        (settings.ws.max_sockets > 0, "ws.max_sockets: expected a positive integer"),
        (settings.ws.idle_seconds > 0, "ws.idle_seconds: expected a positive number"),
        (settings.ws.stall_seconds > 0, "ws.stall_seconds: expected a positive number"),
        (settings.ws.close_seconds > 0, "ws.close_seconds: expected a positive number"),
        (settings.ws.max_answer_chars > 0, "ws.max_answer_chars: expected a positive integer"),
        (_networks_ok(settings.ops.metrics_allow),
         "ops.metrics_allow: expected IP addresses or CIDR networks"),
        (not settings.admin.token or len(settings.admin.token) >= MIN_ADMIN_TOKEN,
         f"admin.token: expected at least {MIN_ADMIN_TOKEN} characters (or none: the admin API is off)"),
        (bool(_SIZE.match(settings.images.size)), "images.size: expected WIDTHxHEIGHT, e.g. 256x256"),
        (bool(_HHMM.match(settings.images.prune_at)), "images.prune_at: expected HH:MM"),
        (settings.images.retention_hours > 0, "images.retention_hours: expected a positive number"),
        (settings.images.max_total_mb > 0, "images.max_total_mb: expected a positive number"),
        (settings.images.download_mb > 0, "images.download_mb: expected a positive number"),
        (settings.images.download_seconds > 0, "images.download_seconds: expected a positive number"),
        (bool(settings.images.folder.strip()), "images.folder: must not be empty"),
        (bool(settings.state.file.strip()), "state.file: must not be empty"),
        (not settings.state.redis_url or settings.state.redis_url.startswith(("redis://", "rediss://", "unix://")),
         "state.redis_url (or REDIS_URL): expected a redis://, rediss:// or unix:// URL"),
        (settings.state.redis_fail in ("open", "closed"), "state.redis_fail: expected open or closed"),
        (settings.chat.max_conversations > 0, "chat.max_conversations: expected a positive integer"),
        (settings.chat.max_turns > 0, "chat.max_turns: expected a positive integer"),
        (settings.chat.ttl_hours > 0, "chat.ttl_hours: expected a positive number"),
        (settings.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
         "logging.level: expected DEBUG, INFO, WARNING or ERROR"),
        (settings.logging.format in ("text", "json"), "logging.format: expected text or json"),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(f"setting {message}")
    return settings


def notes(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for the start-up log: settings that load but probably do not do what was meant."""
    env = os.environ if env is None else env
    lines = [f"upstream {e.name}: {e.api_keys_env} is not set, so its key pool is empty "
             f"(callers' own keys still reach it)" for e in settings.upstreams if e.api_keys_env and not e.api_keys]
    routes = settings.routes()
    if settings.pool_provider == "openai" and not any(e.api_keys for e in routes.serving(settings.default_model)):
        lines.append(f"no upstream serving the default model {settings.default_model} has a key: questions "
                     f"on the server's keys will be refused")
    if not routes.drawing():
        lines.append("no upstream draws pictures (images: true): pictures will be refused")
    elif settings.pool_provider == "openai" and not any(e.api_keys for e in routes.drawing()):
        lines.append("no upstream that draws pictures has a key: pictures on the server's keys will be refused")
    if settings.upstreams:
        if env.get("OPENAI_API_KEY", "").strip() and all(e.api_keys_env != "OPENAI_API_KEY"
                                                           for e in settings.upstreams):
            lines.append("OPENAI_API_KEY is ignored: the settings list their upstreams (upstreams:) "
                         "and none names it in api_keys_env")
        if env.get("OPENAI_BASE_URL", "").strip():
            lines.append("OPENAI_BASE_URL is ignored: the settings list their upstreams (upstreams:), "
                         "each with its base_url")
    return lines
