"""Settings: every section together, with the rules that tie upstreams and models to each other."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from chatgpt.domain.routes import RouteError, RouteTable
from chatgpt.settings.errors import SettingsError
from chatgpt.settings.sections import (
    SHORTHAND_KEYS,
    AdminSettings,
    ApiSettings,
    ChatSettings,
    ImagesSettings,
    LimitsSettings,
    LoggingSettings,
    ModelsSettings,
    ModerationSettings,
    OpsSettings,
    QuotaSettings,
    RuntimeSettings,
    ServerSettings,
    StateSettings,
    UpstreamEntry,
    UpstreamSettings,
    WechatSettings,
    WsSettings,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # shown in metrics labels, logs and state keys
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def replace_section(settings: Settings, section: str, **changes: Any) -> Settings:
    """Return a copy of `settings` with fields of one section changed (tests and CLI flags)."""
    return dataclasses.replace(settings, **{section: dataclasses.replace(getattr(settings, section), **changes)})
