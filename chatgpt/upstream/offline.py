"""The built-in offline provider: an honest canned answer, streamed token by token, no network."""
from __future__ import annotations

import asyncio
import base64
import re
import struct
import uuid
import zlib
from collections.abc import AsyncIterator

from chatgpt.domain import texts
from chatgpt.domain.provider import ChatRequest, Delta, GeneratedImage

# Words with their trailing spaces, CJK text a few characters at a time: the stream looks like a
# model's and the pieces join back to the exact text.
_CJK = "\u3000-\u9fff\uff00-\uffef"
_TOKEN = re.compile(rf"[{_CJK}]{{1,3}}|[^\s{_CJK}]+\s*|\s+")


class OfflineProvider:
    """Answers every question with the same notice that no upstream key is configured."""

    name = "offline"

    def __init__(self, delay: float = 0.02) -> None:
        self._delay = delay

    async def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[list[Delta]]:
        """Stream the canned notice; `request` and `key` are ignored on purpose."""
        answer_id = f"chatcmpl-offline-{uuid.uuid4().hex[:24]}"
        for token in _TOKEN.findall(texts.OFFLINE_ANSWER):
            yield [Delta(token, answer_id=answer_id)]
            await asyncio.sleep(self._delay)
        yield [Delta(finish_reason="stop", answer_id=answer_id)]

    async def generate_image(self, prompt: str, size: str, key: str | None,
                             model: str | None = None) -> GeneratedImage:
        """A plain grey placeholder picture of the asked size: honest, and needs no network."""
        width, height = (int(n) for n in size.split("x"))
        return GeneratedImage(b64=base64.b64encode(placeholder_png(width, height)).decode())


def placeholder_png(width: int, height: int, grey: int = 0xCC) -> bytes:
    """A valid single-colour greyscale PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([grey]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
