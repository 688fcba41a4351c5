"""The settings' sections: one frozen dataclass per YAML section, with its defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

from chatgpt.settings.errors import SettingsError


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str = ""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    event_loop: str = "auto"  # auto: uvloop when it is installed, else asyncio's own | uvloop | asyncio
    stream_interval_ms: int = 50  # streamed HTTP answers: at most one write per interval (0: one per upstream read)


@dataclass(frozen=True)
class UpstreamSettings:
    provider: str = "auto"
    base_url: str = "https://api.openai.com/v1"
    api_keys: tuple[str, ...] = ()
    model: str = "gpt-3.5-turbo"
    models: tuple[str, ...] = ("gpt-3.5-turbo",)
    temperature: float = 0.0
    max_tokens: int = 2048
    system_prompt: str = ""
    context_chars: int = 12000
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # the longest wait for the next answer event (comments do not count)
    answer_timeout: float = 600.0  # the cap on one answer
    usage: bool = True  # the shorthand's upstream: ask streamed answers for stream_options.include_usage
    baixing_url: str = "https://gpt.baixing.com"
    baixing_key: str = ""


@dataclass(frozen=True)
class UpstreamEntry:
    """One of `upstreams:` (PROTOCOL.md E.4): where questions for its models go, with which keys."""

    name: str = ""
    base_url: str = ""
    api_keys: tuple[str, ...] = ()
    api_keys_env: str = ""  # the variable the keys were read from (kept to explain an empty pool)
    models: tuple[str, ...] = ()
    images: bool = False
    usage: bool = True  # the upstream honours stream_options.include_usage


@dataclass(frozen=True)
class ModelsSettings:
    """What clients may name: the default model, aliases (client name -> upstream model), the image model."""

    default: str = ""  # empty: upstream.model with the `upstream:` shorthand, else the first upstream's first
    aliases: dict[str, str] = field(default_factory=dict)
    image: str = ""  # empty: no model is named, the picture upstream draws with its own default


# `upstream:` keys that describe the one upstream of the shorthand; with `upstreams:` they go on each entry.
SHORTHAND_KEYS = ("base_url", "api_keys", "model", "models", "usage")


@dataclass(frozen=True)
class LimitsSettings:
    http_per_second: float = 5.0
    ws_per_minute: float = 20.0


@dataclass(frozen=True)
class QuotaSettings:
    daily_questions: int = 20
    baixing_daily_questions: int = 5


@dataclass(frozen=True)
class WsSettings:
    max_message_bytes: int = 1048576
    frame_interval_ms: int = 50
    bytes_per_second: int = 15000
    burst_bytes: int = 700000
    max_sockets_per_ip: int = 50
    max_sockets: int = 10000
    idle_seconds: float = 90.0
    stall_seconds: float = 25.0
    close_seconds: float = 5.0
    max_answer_chars: int = 200000
    reasoning: str = "live"  # live: show the model's thinking as a quote until the answer starts; hide

@dataclass(frozen=True)
class ImagesSettings:
    folder: str = "static"
    size: str = "256x256"
    retention_hours: float = 24.0
    prune_at: str = "01:00"
    max_total_mb: float = 512.0
    download_mb: float = 20.0
    download_seconds: float = 60.0


@dataclass(frozen=True)
class StateSettings:
    file: str = "state.json"
    redis_url: str = ""  # set: quotas, flags, /chat memory, key health... shared through Redis
    redis_fail: str = "open"  # Redis unreachable: open (count locally) | closed (refuse quota questions)


@dataclass(frozen=True)
class ApiSettings:
    client_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdminSettings:
    token: str = ""


@dataclass(frozen=True)
class OpsSettings:
    metrics_allow: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class ChatSettings:
    max_conversations: int = 1000
    max_turns: int = 20
    ttl_hours: float = 24.0


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    format: str = "text"
    prompts: bool = False


@dataclass(frozen=True)
class RuntimeSettings:
    status: str = "TRUE"
    isDebug: str = "FALSE"
    announcement: str = ""
    demoChat: str = ""


@dataclass(frozen=True)
class WechatSettings:
    appid: str = ""  # empty: WeChat login is off
    secret: str = field(default="", repr=False)  # or WECHAT_APP_SECRET
    api_base: str = "https://api.weixin.qq.com"
    session_days: int = 30
    msg_sec_check: bool = False
    fail_open: bool = True
    token_secret: str = field(default="", repr=False)  # empty: a random one kept in the store (state file or Redis)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.api_base.startswith(("http://", "https://")), "api_base: expected an http:// or https:// URL"),
            (1 <= self.session_days <= 365, "session_days: expected 1..365"),
            (bool(self.appid) or not self.secret, "appid: needed when wechat.secret (or WECHAT_APP_SECRET) is set"),
            (bool(self.secret) or not self.appid, "secret: needed when wechat.appid is set (or set WECHAT_APP_SECRET)"),
            (bool(self.appid) or not self.msg_sec_check, "msg_sec_check: needs wechat.appid and wechat.secret"),
            (not self.token_secret or len(self.token_secret) >= 16, "token_secret: expected 16 characters or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(f"setting wechat.{message}")


@dataclass(frozen=True)
class ModerationSettings:
    words_file: str = ""  # UTF-8, one word a line; empty: no listed words
    action: str = "mask"  # mask | refuse

    def __post_init__(self) -> None:
        if self.action not in ("mask", "refuse"):
            raise SettingsError("setting moderation.action: expected mask or refuse")
