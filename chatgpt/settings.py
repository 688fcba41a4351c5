"""Settings: frozen dataclasses read once from YAML and the environment, checked key by key."""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatgpt.domain.routes import RouteError, RouteTable


class SettingsError(Exception):
    """A setting is unknown, of the wrong type or out of range; the message names the key (or the
    environment variable it came from)."""

    def __init__(self, message: str, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        if key is None and message.startswith("setting ") and ": " in message:
            key, _, reason = message.removeprefix("setting ").partition(": ")
        self.key = key  # the dotted setting, e.g. "upstream.base_url", when one is at fault
        self.reason = reason or message


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str = ""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    event_loop: str = "auto"  # auto: uvloop when it is installed, else asyncio's own | uvloop | asyncio


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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # shown in metrics labels, logs and state keys
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    upstreams: tuple[UpstreamEntry, ...] = ()
    models: ModelsSettings = field(default_factory=ModelsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    images: ImagesSettings = field(default_factory=ImagesSettings)
    state: StateSettings = field(default_factory=StateSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    wechat: WechatSettings = field(default_factory=WechatSettings)
    moderation: ModerationSettings = field(default_factory=ModerationSettings)

    def __post_init__(self) -> None:
        """The upstreams and models must agree: one line naming the first setting that does not."""
        if self.upstreams:
            default = UpstreamSettings()
            for name in SHORTHAND_KEYS:
                if getattr(self.upstream, name) != getattr(default, name):
                    raise SettingsError(f"setting upstream.{name}: not used with upstreams: "
                                        f"(set {name} on each upstream, or drop upstreams:)")
        for index, entry in enumerate(self.upstreams):
            where = f"setting upstreams[{index}]"
            if not _NAME.match(entry.name):
                raise SettingsError(f"{where}.name: expected letters, digits, '.', '_' or '-', got {entry.name!r}")
            if not entry.base_url.startswith(("http://", "https://")):
                raise SettingsError(f"{where}.base_url: expected an http:// or https:// URL")
            if entry.api_keys_env and not _ENV_NAME.match(entry.api_keys_env):
                raise SettingsError(f"{where}.api_keys_env: {entry.api_keys_env!r} is not a variable name")
        try:
            self.routes()
        except RouteError as error:
            raise SettingsError(str(error)) from None

    @property
    def upstream_entries(self) -> tuple[UpstreamEntry, ...]:
        """The upstreams in routing order; the `upstream:` shorthand is one upstream named "default"."""
        if self.upstreams:
            return self.upstreams
        u = self.upstream
        models = tuple(dict.fromkeys((*u.models, u.model)))
        return (UpstreamEntry("default", u.base_url, u.api_keys, "", models, images=True, usage=u.usage),)

    @property
    def default_model(self) -> str:
        """The model of a question that names none."""
        if self.models.default:
            return self.models.default
        return self.upstream.model if not self.upstreams else self.upstreams[0].models[0]

    def routes(self) -> RouteTable[UpstreamEntry]:
        """The routing table of these settings (raises RouteError when they contradict each other)."""
        return RouteTable(self.upstream_entries, self.default_model, self.models.aliases, self.models.image)

    @property
    def pool_provider(self) -> str:
        """The provider that answers on the server's pools: `openai`, or `offline` when no upstream has a key."""
        if self.upstream.provider == "auto":
            return "openai" if any(e.api_keys for e in self.upstream_entries) else "offline"
        return self.upstream.provider

    @property
    def public_url(self) -> str:
        """Base URL of links this server hands out (images)."""
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "::", "") else self.server.host
        return f"http://{host}:{self.server.port}"


def _type_name(kind: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, "a list of strings"
    )


def _convert(key: str, kind: Any, value: Any) -> Any:
    """Check one leaf value against its declared type; numbers from YAML ints are accepted as floats."""
    origin = typing.get_origin(kind)
    if origin is tuple and dataclasses.is_dataclass(item := typing.get_args(kind)[0]):
        if value is None:  # `upstreams:` with every entry commented out
            return ()
        if not isinstance(value, list):
            raise SettingsError(f"setting {key}: expected a list of mappings, got {value!r}")
        return tuple(_build(typing.cast(type, item), entry, f"{key}[{i}].") for i, entry in enumerate(value))
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in value.items()):
            raise SettingsError(f"setting {key}: expected a mapping of names to names, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"setting {key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise SettingsError(f"setting {key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingsError(f"setting {prefix.rstrip('.') or 'file'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise SettingsError(f"setting {prefix}{key}: unknown key")
    values: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        kind = hints[name]
        key = f"{prefix}{name}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[name] = _build(kind, data[name], key + ".")
        else:
            values[name] = _convert(key, kind, data[name])
    return cls(**values)


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The file's section `name` as a dict to add overrides to (an empty `name:` counts as {})."""
    if raw.get(name) is None:
        raw[name] = {}
    section = raw[name]
    return section if isinstance(section, dict) else {}  # a wrong type is reported by _build


def _keys_of(value: str) -> list[str]:
    """Keys from an environment variable: comma-separated, blanks dropped."""
    return [k.strip() for k in value.split(",") if k.strip()]


def _env_keys(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    """Each upstream's `api_keys_env` is read into its `api_keys`. An unset variable gives an empty pool,
    not a refusal: the shipped settings name providers an operator may not use, and an upstream without
    keys still serves callers' own keys. The start-up log says so (`notes`)."""
    entries = raw.get("upstreams")
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("api_keys_env"), str):
            continue  # a wrong type is reported by _build
        if "api_keys" in entry:
            raise SettingsError(f"setting upstreams[{index}].api_keys_env: give api_keys or api_keys_env, not both")
        entry["api_keys"] = _keys_of(env.get(entry["api_keys_env"].strip(), ""))


# Environment variable → the setting it fills; a secret's value is never shown in an error.
ENV_SETTINGS = {"OPENAI_API_KEY": "upstream.api_keys", "OPENAI_BASE_URL": "upstream.base_url",
                "BAIXING_API_KEY": "upstream.baixing_key", "REDIS_URL": "state.redis_url",
                "CHATGPT_ADMIN_TOKEN": "admin.token", "WECHAT_APP_SECRET": "wechat.secret"}
# A Redis URL may hold a password: shown no more than a key.
SECRET_ENV = frozenset({"OPENAI_API_KEY", "BAIXING_API_KEY", "REDIS_URL", "CHATGPT_ADMIN_TOKEN",
                        "WECHAT_APP_SECRET"})
SHORTHAND_ENV = frozenset({"OPENAI_API_KEY", "OPENAI_BASE_URL"})


def _env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Secrets from the environment win over the file; returns {setting: variable} of those applied."""
    applied: dict[str, str] = {}
    for variable, setting in ENV_SETTINGS.items():
        value = env.get(variable, "").strip()
        # OPENAI_API_KEY / OPENAI_BASE_URL fill the one-upstream shorthand only; with `upstreams:` an
        # upstream names its variable in api_keys_env.
        if not value or (variable in SHORTHAND_ENV and raw.get("upstreams")):
            continue
        section, name = setting.split(".")
        _section(raw, section)[name] = _keys_of(value) if variable == "OPENAI_API_KEY" else value
        applied[setting] = variable
    _env_keys(raw, env)
    return applied


def _env_error(error: SettingsError, applied: dict[str, str], env: Mapping[str, str]) -> SettingsError:
    """An error in a setting that came from the environment, told as the variable and its value."""
    variable = applied.get(error.key or "")
    if variable is None:
        return error
    shown = "(value hidden)" if variable in SECRET_ENV else repr(env[variable].strip())
    return SettingsError(f"environment variable {variable}={shown}: {error.reason} (it sets {error.key})",
                         error.key, error.reason)


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


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `path` (or ./settings.yaml when present), apply env overrides, validate."""
    env = os.environ if env is None else env
    raw: Any = {}
    if path is None and Path("settings.yaml").is_file():
        path = "settings.yaml"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"settings file {path}: cannot read ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise SettingsError(f"settings file {path}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"settings file {path}: expected a mapping at the top level")
    applied = _env_overrides(raw, env)
    token = env.get("CHATGPT_ADMIN_TOKEN", "").strip()
    if token and len(token) < MIN_ADMIN_TOKEN:  # named as the variable it came from; never shown
        raise SettingsError(f"environment variable CHATGPT_ADMIN_TOKEN: expected at least {MIN_ADMIN_TOKEN} "
                            f"characters, got {len(token)}")
    try:
        return validate(_build(Settings, raw, ""))
    except SettingsError as error:
        raise _env_error(error, applied, env) from None


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


def replace_section(settings: Settings, section: str, **changes: Any) -> Settings:
    """Return a copy of `settings` with fields of one section changed (tests and CLI flags)."""
    return dataclasses.replace(settings, **{section: dataclasses.replace(getattr(settings, section), **changes)})


