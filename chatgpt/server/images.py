"""Generated pictures: saved under the images folder, served at `/res/<name>`, pruned by age and size."""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import aiohttp

from chatgpt.domain.errors import UpstreamBroken
from chatgpt.domain.pictures import StoredImage
from chatgpt.domain.provider import GeneratedImage
from chatgpt.domain.failover import host_of
from chatgpt.upstream.network import upstream_call

log = logging.getLogger(__name__)

# Only names this server makes are served or pruned; anything else in the folder is left alone.
NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpg|webp|gif)$")
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
DOWNLOAD_LIMIT = 20 * 1024 * 1024
DOWNLOAD_SECONDS = 60.0
SIGNATURE_BYTES = 12  # enough to tell PNG, JPEG, WebP and GIF apart


def image_kind(head: bytes) -> str | None:
    """The picture's real type from its first bytes (never the upstream's Content-Type)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


class ImageUsage:
    """How many of our pictures the folder holds and their bytes, kept current by the code that saves
    and prunes them: a `/metrics` scrape reads two numbers instead of scanning the folder."""

    def __init__(self, on_change: Callable[[int, int], None] = lambda count, size: None) -> None:
        self.count = 0
        self.bytes = 0
        self._on_change = on_change

    def added(self, size: int) -> None:
        """One picture of `size` bytes was saved."""
        self.set(self.count + 1, self.bytes + size)

    def set(self, count: int, size: int) -> None:
        """The folder's exact usage, as a scan found it."""
        self.count, self.bytes = count, size
        self._on_change(count, size)


def _publish(temp: Path, final: Path) -> int:
    """Give a complete picture its served name; its size."""
    os.replace(temp, final)
    return os.stat(final).st_size


class ImageStore:
    """The domain's `PictureStore`: downloads or decodes upstream pictures into the folder; a file
    appears only when complete."""

    def __init__(self, folder: str | Path, public_url: str, session: aiohttp.ClientSession,
                 limit: int = DOWNLOAD_LIMIT, download_seconds: float = DOWNLOAD_SECONDS,
                 usage: ImageUsage | None = None) -> None:
        self.folder = Path(folder)
        self.public_url = public_url.rstrip("/")
        self._session = session
        self._limit = limit
        self._download_seconds = download_seconds
        self._usage = usage or ImageUsage()

    async def store(self, image: GeneratedImage) -> StoredImage:
        """Save `image` as `<uuid>.<type>`; raise UpstreamBroken for a non-image or an oversized one."""
        await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
        stem = uuid.uuid4().hex
        temp = self.folder / f".{stem}.part"  # not matching NAME: never served, never pruned
        try:
            if image.b64 is not None:
                kind = await self._decode(image.b64, temp)
            else:
                kind = await self._download(str(image.url), temp)
            name = f"{stem}.{kind}"
            size = await asyncio.to_thread(_publish, temp, self.folder / name)
        except BaseException:
            await asyncio.to_thread(temp.unlink, missing_ok=True)
            raise
        self._usage.added(size)
        return StoredImage(name, f"{self.public_url}/res/{name}")

    def read(self, stored: StoredImage) -> bytes:
        """The saved picture's bytes (blocking: call it in a thread)."""
        return (self.folder / stored.name).read_bytes()

    async def _decode(self, b64: str, temp: Path) -> str:
        if len(b64) > self._limit * 4 // 3 + 4:
            raise UpstreamBroken("the picture is larger than the download limit")
        try:
            data = await asyncio.to_thread(base64.b64decode, b64, validate=True)
        except (binascii.Error, ValueError):
            raise UpstreamBroken("the picture is not valid base64") from None
        kind = image_kind(data[:16])
        if kind is None:
            raise UpstreamBroken("the upstream's picture is not an image")
        await asyncio.to_thread(temp.write_bytes, data)
        return kind

    async def _download(self, url: str, temp: Path) -> str:
        timeout = aiohttp.ClientTimeout(total=self._download_seconds, sock_connect=10)
        opened = False
        with upstream_call(host_of(url), lambda: opened):
            async with self._session.get(url, timeout=timeout) as response:
                opened = True
                return await self._write_stream(response, temp)

    async def _write_stream(self, response: aiohttp.ClientResponse, temp: Path) -> str:
        handle = await _open_for_writing(temp)
        try:
            size, head, kind = 0, b"", None
            async for chunk in response.content.iter_chunked(64 * 1024):
                if kind is None:
                    # A network read may be shorter than a signature: decide on the first 12 bytes.
                    head += chunk[:SIGNATURE_BYTES]
                    kind = image_kind(head)
                    if kind is None and len(head) >= SIGNATURE_BYTES:
                        raise UpstreamBroken("the downloaded picture is not an image")
                size += len(chunk)
                if size > self._limit:
                    raise UpstreamBroken("the picture is larger than the download limit")
                await asyncio.to_thread(handle.write, chunk)
            if kind is None:
                raise UpstreamBroken("the picture download was empty" if not head else
                                     "the downloaded picture is not an image")
            return kind
        finally:
            await asyncio.to_thread(handle.close)


async def _open_for_writing(path: Path) -> BinaryIO:
    """`open(path, "wb")` off the event loop. A cancel (the client left) waits for the open to finish
    and closes the file, so nothing leaks and the caller's clean-up finds the file to remove."""
    opening = asyncio.ensure_future(asyncio.to_thread(open, path, "wb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with suppress(OSError):
            (await opening).close()
        raise


def safe_image_path(folder: str | Path, name: str) -> Path | None:
    """The file for `/res/<name>` if it is one of ours, really inside the folder; else None."""
    if not NAME.match(name):
        return None  # rejects `..`, separators, hidden and foreign names before touching the disk
    root = Path(folder).resolve()
    path = root / name
    try:
        if path.is_symlink() or not path.is_file() or path.resolve().parent != root:
            return None
    except OSError:
        return None
    return path


def prune(folder: str | Path, now: float, max_age: float, max_total_bytes: int) -> list[str]:
    """Delete our pictures older than `max_age` seconds, then the oldest until the folder holds at
    most `max_total_bytes`; return the removed names. Files being written do not match NAME."""
    entries = []
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                if NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    entries.append((stat.st_mtime, stat.st_size, entry.name))
    except FileNotFoundError:
        return []
    entries.sort()
    removed: list[str] = []
    total = sum(size for _, size, _ in entries)
    for mtime, size, name in entries:
        if now - mtime <= max_age and total <= max_total_bytes:
            break
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        removed.append(name)
        total -= size
    return removed


def folder_usage(folder: str | Path) -> tuple[int, int]:
    """How many of our pictures the folder holds, and their bytes."""
    count = size = 0
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                if NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    count += 1
                    size += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return count, size


def seconds_until(hhmm: str, now: datetime) -> float:
    """Seconds from `now` (local) to the next `HH:MM`."""
    hour, minute = (int(p) for p in hhmm.split(":"))
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= now:
        target += timedelta(days=1)
    return (target - now).total_seconds()


class Pruner:
    """The background task: a pass daily at `prune_at`, and whenever the folder is over its cap."""

    def __init__(self, folder: str | Path, max_age: float, max_total_bytes: int, prune_at: str,
                 check_every: float = 60.0, clock: Callable[[], datetime] = datetime.now,
                 usage: ImageUsage | None = None) -> None:
        self.folder, self.max_age, self.max_total = folder, max_age, max_total_bytes
        self.prune_at, self.check_every = prune_at, check_every
        self._clock = clock  # local wall time; tests move it instead of sleeping until 01:00
        self.usage = usage or ImageUsage()

    async def measure(self) -> None:
        """Scan the folder once (at start, and after each pass) for the exact usage."""
        self.usage.set(*await asyncio.to_thread(folder_usage, self.folder))

    async def run_pass(self) -> list[str]:
        """One pass now, off the event loop."""
        now = self._clock().timestamp()
        removed = await asyncio.to_thread(prune, self.folder, now, self.max_age, self.max_total)
        await self.measure()
        if removed:
            log.info("pruned %d picture(s) from %s", len(removed), self.folder)
        return removed

    async def run_forever(self) -> None:
        """Never dies of a failed pass: it is logged and the next one comes as scheduled."""
        due = self._clock() + timedelta(seconds=seconds_until(self.prune_at, self._clock()))
        while True:
            await asyncio.sleep(min(self.check_every, max(0.0, (due - self._clock()).total_seconds())))
            try:
                now = self._clock()
                if now >= due:
                    due = now + timedelta(seconds=seconds_until(self.prune_at, now))
                    await self.run_pass()
                else:
                    await self.measure()  # also catches files changed behind our back
                    if self.usage.bytes > self.max_total:
                        await self.run_pass()
            except Exception:
                log.exception("picture pruning pass failed; the task goes on")
