"""Settings: frozen dataclasses read once from YAML and the environment, checked key by key.

The parts live beside each other: `sections` (one dataclass per YAML section), `root` (Settings, the
rules tying upstreams to models), `loader` (file and environment), `checks` (ranges, start-up notes)."""
from chatgpt.settings.checks import MIN_ADMIN_TOKEN, notes, validate
from chatgpt.settings.errors import SettingsError
from chatgpt.settings.loader import ENV_SETTINGS, SECRET_ENV, SHORTHAND_ENV, load_settings
from chatgpt.settings.root import Settings, replace_section
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

__all__ = [
    "ENV_SETTINGS", "MIN_ADMIN_TOKEN", "SECRET_ENV", "SHORTHAND_ENV", "SHORTHAND_KEYS", "AdminSettings",
    "ApiSettings", "ChatSettings", "ImagesSettings", "LimitsSettings", "LoggingSettings", "ModelsSettings",
    "ModerationSettings", "OpsSettings", "QuotaSettings", "RuntimeSettings", "ServerSettings", "Settings",
    "SettingsError", "StateSettings", "UpstreamEntry", "UpstreamSettings", "WechatSettings", "WsSettings",
    "load_settings", "notes", "replace_section", "validate",
]
