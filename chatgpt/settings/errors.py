"""SettingsError: the one error of loading settings, naming the key or the variable at fault."""
from __future__ import annotations


class SettingsError(Exception):
    """A setting is unknown, of the wrong type or out of range; the message names the key (or the
    environment variable it came from)."""

    def __init__(self, message: str, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        if key is None and message.startswith("setting ") and ": " in message:
            key, _, reason = message.removeprefix("setting ").partition(": ")
        self.key = key  # the dotted setting, e.g. "upstream.base_url", when one is at fault
        self.reason = reason or message

