"""The built-in offline provider: an honest canned answer, streamed token by token, no network."""
from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

from .. import messages
from . import ChatRequest, Delta

# Words with their trailing spaces, CJK text a few characters at a time: the stream looks like a
# model's and the pieces join back to the exact text.
_CJK = "\u3000-\u9fff\uff00-\uffef"
_TOKEN = re.compile(rf"[{_CJK}]{{1,3}}|[^\s{_CJK}]+\s*|\s+")


class OfflineProvider:
    """Answers every question with the same notice that no upstream key is configured."""

    name = "offline"

    def __init__(self, delay: float = 0.02) -> None:
        self._delay = delay

    async def stream(self, request: ChatRequest, key: str | None) -> AsyncIterator[Delta]:
        """Stream the canned notice; `request` and `key` are ignored on purpose."""
        answer_id = f"chatcmpl-offline-{uuid.uuid4().hex[:24]}"
        for token in _TOKEN.findall(messages.OFFLINE_ANSWER):
            yield Delta(answer_id, token)
            await asyncio.sleep(self._delay)
        yield Delta(answer_id, "", "stop")
