"""Runtime flags (the seed's "cache"): changed while serving, read on every question."""
from __future__ import annotations

from typing import Any

from chatgpt.domain.store import Store
from chatgpt.settings import RuntimeSettings

TEXT_LIMIT = 20000  # announcement / demoChat are shown in the client; keep them bounded


class RuntimeFlags:
    """Current values of `status`, `isDebug`, `announcement`, `demoChat` and `demoLimit`."""

    NAMES = ("status", "isDebug", "announcement", "demoChat", "demoLimit")

    def __init__(self, initial: RuntimeSettings, demo_limit: int, store: Store | None = None) -> None:
        """Start from the configured values; with a store, changes made elsewhere are applied here."""
        self._store = store
        if store is not None:
            store.watch_flags(self.restore, self.as_dict)
        self.status = initial.status
        self.isDebug = initial.isDebug
        self.announcement = initial.announcement
        self.demoChat = initial.demoChat
        self.demoLimit = demo_limit

    @property
    def serving(self) -> bool:
        """False while the operator has the server in maintenance."""
        return self.status.strip().upper() == "TRUE"

    @property
    def debug(self) -> bool:
        """True routes chat to the Baixing relay (PROTOCOL.md A.7)."""
        return self.isDebug.strip().upper() == "TRUE"

    def as_dict(self) -> dict[str, Any]:
        """All flags, JSON-safe."""
        return {name: getattr(self, name) for name in self.NAMES}

    def snapshot(self) -> dict[str, Any]:
        """The flags as kept in the state file."""
        return self.as_dict()

    def restore(self, data: Any) -> None:
        """Take back saved flags; a value that fails the checks keeps its configured one."""
        if not isinstance(data, dict):
            return
        for name in self.NAMES:
            if name in data:
                try:
                    self.update({name: data[name]})
                except ValueError:
                    pass

    async def change(self, changes: Any) -> dict[str, Any]:
        """The admin's change: checked, applied here, then published to every instance (the store)."""
        checked = self.check(changes)
        self._apply(checked)
        if self._store is not None:
            await self._store.publish_flags(checked)
        return self.as_dict()

    def update(self, changes: Any) -> dict[str, Any]:
        """Apply a JSON object of changes after checking every one; raise ValueError naming the field."""
        self._apply(self.check(changes))
        return self.as_dict()

    def _apply(self, checked: dict[str, Any]) -> None:
        for name, value in checked.items():
            setattr(self, name, value)

    def check(self, changes: Any) -> dict[str, Any]:
        """The changes if every one is valid; raise ValueError naming the first bad field."""
        if not isinstance(changes, dict) or not changes:
            raise ValueError("expected a non-empty JSON object of flags")
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in self.NAMES:
                raise ValueError(f"unknown flag {name!r}")
            if name == "demoLimit":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100000:
                    raise ValueError("demoLimit: expected an integer 0..100000")
            elif not isinstance(value, str) or len(value) > TEXT_LIMIT:
                raise ValueError(f"{name}: expected a string of at most {TEXT_LIMIT} characters")
            elif name in ("status", "isDebug") and value.strip().upper() not in ("TRUE", "FALSE"):
                raise ValueError(f"{name}: expected TRUE or FALSE")
            checked[name] = value
        return checked
