"""The state file: quotas, runtime flags, key health (and more) snapshotted atomically, restored on start."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from chatgpt import jsontext

log = logging.getLogger(__name__)

VERSION = 1


class Snapshotting(Protocol):
    """Anything whose state survives a restart."""

    def snapshot(self) -> Any:
        """JSON-safe state."""
        ...

    def restore(self, data: Any) -> None:
        """Take back what `snapshot` gave; ignore anything malformed."""
        ...


class StateFile:
    """Saves named parts to one JSON file with temp file + fsync + rename, so a crash mid-write
    leaves the previous file whole; a corrupt file is moved aside, never overwritten."""

    def __init__(self, path: str | Path, parts: dict[str, Snapshotting]) -> None:
        self.path = Path(path)
        self.parts = parts
        self._written: str | None = None
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Restore every part from the file; report a missing or corrupt file in one log line."""
        self._remove_stale_temps()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            log.info("state file %s not found: starting with fresh quotas and flags", self.path)
            return
        except OSError as exc:
            log.warning("state file %s unreadable (%s): starting fresh", self.path, exc.strerror)
            return
        try:
            data = jsontext.parse(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError("not a state snapshot")
        except ValueError:  # includes invalid UTF-8
            aside = self._set_aside()
            log.warning("state file %s is corrupt: kept as %s, starting fresh", self.path, aside)
            return
        for name, part in self.parts.items():
            try:
                part.restore(data.get(name))
            except Exception:  # one bad part must not stop the start
                log.exception("state part %s could not be restored; it starts fresh", name)
        self._written = self._serialise()
        log.info("state restored from %s", self.path)

    def _remove_stale_temps(self) -> None:
        """Temp files of writes cut short by a kill: the state file itself is whole (atomic rename)."""
        for temp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            try:
                temp.unlink()
            except OSError:
                pass

    def _set_aside(self) -> Path:
        """Move a corrupt file to a fresh name (never over an earlier one) so it can be inspected."""
        for n in range(1000):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}-{n}")
            try:
                os.link(self.path, aside)  # fails if the name exists: nothing is overwritten
            except FileExistsError:
                continue
            except OSError:  # no hard links on this filesystem: rename to the free name instead
                if aside.exists():
                    continue
                os.rename(self.path, aside)
                return aside
            self.path.unlink()
            return aside
        return self.path

    def _serialise(self) -> str:
        return json.dumps({"version": VERSION, **{n: p.snapshot() for n, p in self.parts.items()}},
                          sort_keys=True)  # ASCII escapes: any string, even a lone surrogate, can be written

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def save_now(self) -> bool:
        """Write synchronously if anything changed (shutdown); True when written."""
        text = self._serialise()
        if text == self._written:
            return False
        self._write(text)
        self._written = text
        return True

    async def save(self) -> bool:
        """Write if anything changed, without blocking the event loop on disk I/O."""
        async with self._lock:
            text = self._serialise()
            if text == self._written:
                return False
            await asyncio.to_thread(self._write, text)
            self._written = text
            return True

    async def save_periodically(self, interval: float) -> None:
        """Background task: snapshot every `interval` seconds; a failed write is logged and retried."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.save()
            except OSError as exc:
                log.warning("state file %s not written (%s); will retry", self.path, exc.strerror)
            except Exception:  # the task must outlive any one bad snapshot
                log.exception("state file %s not written; will retry", self.path)
