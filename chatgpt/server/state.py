"""The state file: quotas, runtime flags, key health (and more) snapshotted atomically, restored on start."""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from chatgpt import jsontext

log = logging.getLogger(__name__)

VERSION = 1
SPLIT_AT = 64  # a part with more entries than this (the /chat memory) is serialised entry by entry


class StateLocked(Exception):
    """Another process holds the state file: two writers would overwrite each other's saves."""


def serialise_pieces(data: dict[str, Any]) -> Iterator[str]:
    """The text of `json.dumps(data, sort_keys=True)` in small pieces: a big part (the /chat memory) is
    dumped entry by entry. Run in a thread, one big dumps, join or compare would hold the GIL (and so
    stop the event loop) for as long as it takes; between small steps the loop gets the GIL back."""
    yield "{"
    for n, name in enumerate(sorted(data)):
        yield (", " if n else "") + json.dumps(name) + ": "
        value = data[name]
        if isinstance(value, dict) and len(value) > SPLIT_AT:
            yield "{"
            for m, key in enumerate(sorted(value)):
                yield (", " if m else "") + json.dumps(key) + ": " + json.dumps(value[key], sort_keys=True)
            yield "}"
        else:
            yield json.dumps(value, sort_keys=True)  # ASCII escapes: any string, even a lone surrogate
    yield "}"


def serialise(data: dict[str, Any]) -> str:
    """Exactly `json.dumps(data, sort_keys=True)`."""
    return "".join(serialise_pieces(data))


def encode(data: dict[str, Any]) -> tuple[list[bytes], bytes]:
    """The state file's bytes in pieces, and their digest (to tell whether anything changed)."""
    digest = hashlib.blake2b(digest_size=32)
    chunks = []
    for piece in serialise_pieces(data):
        chunk = piece.encode("ascii")
        digest.update(chunk)
        chunks.append(chunk)
        time.sleep(0)  # hand the GIL to the event loop now rather than at the next switch interval
    return chunks, digest.digest()


class Snapshotting(Protocol):
    """Anything whose state survives a restart."""

    def snapshot(self) -> Any:
        """JSON-safe state."""
        ...

    def restore(self, data: Any) -> None:
        """Take back what `snapshot` gave; ignore anything malformed."""
        ...


class StateLock:
    """`<state file>.lock`, held (flock) for the life of the process: a second process on the same state
    file would overwrite this one's saves (and used to delete its temp file at start-up)."""

    def __init__(self, state_path: str | Path) -> None:
        path = Path(state_path)
        self.path = path.with_name(path.name + ".lock")
        self.state_path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; StateLocked (naming the holder's pid when known) if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise StateLocked(f"state file {self.state_path} is in use by another process"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}: "
                              f"stop it first, or give this one another state.file") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (at shutdown, after the last save)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StateFile:
    """Saves named parts to one JSON file with temp file + fsync + rename, so a crash mid-write
    leaves the previous file whole; a corrupt file is moved aside, never overwritten."""

    def __init__(self, path: str | Path, parts: dict[str, Snapshotting]) -> None:
        self.path = Path(path)
        self.parts = parts
        self._written: bytes | None = None  # digest of the last text written or read
        self._lock = asyncio.Lock()
        self._writing = threading.Lock()  # a save still running in its thread and the shutdown save

    def load(self, lock: StateLock) -> None:
        """Restore every part from the file; report a missing or corrupt file in one log line.
        Leftover temp files are removed only while `lock` is held: another live process might be
        writing one."""
        if lock.held:
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
        self._written = encode(self._snapshot())[1]
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

    def _snapshot(self) -> dict[str, Any]:
        """Every part's state, taken on the event loop; cheap, as the parts copy no strings."""
        return {"version": VERSION, **{n: p.snapshot() for n, p in self.parts.items()}}

    def _store(self, data: dict[str, Any]) -> bool:
        """Serialise and write `data` if it differs from what was last written (in a thread)."""
        with self._writing:
            chunks, digest = encode(data)
            if digest == self._written:
                return False
            self._write(chunks)
            self._written = digest
            return True

    def _write(self, chunks: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def save_now(self) -> bool:
        """Write synchronously if anything changed (shutdown); True when written."""
        return self._store(self._snapshot())

    async def save(self) -> bool:
        """Write if anything changed: snapshot on the loop, serialise and write in a thread."""
        async with self._lock:
            return await asyncio.to_thread(self._store, self._snapshot())

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
