"""Server-side memory of `/chat` conversations: bounded in count and turns, forgotten after a TTL.

The rules live here; the records live in the store (this process, or Redis for every instance), as
`{"turns": [[question, answer], ...], "used": <epoch>}`. A record read back is checked like any outside
input: a malformed turn is skipped, an expired record is no record.
"""
from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from chatgpt.domain.store import Store

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def _turns(record: Any) -> list[list[str]]:
    """The well-formed (question, answer) turns of a stored record."""
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return []
    return [[t[0], t[1]] for t in turns
            if isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], str)]


def _used(record: Any) -> float | None:
    used = record.get("used") if isinstance(record, dict) else None
    if isinstance(used, bool) or not isinstance(used, (int, float)) or not math.isfinite(used):
        return None
    return float(used)


class ConversationMemory:
    """Turns per conversation id, kept in the store; no aiohttp in here."""

    def __init__(self, store: Store, max_conversations: int, max_turns: int, ttl_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        """Keep at most `max_turns` turns of at most `max_conversations` conversations, each for `ttl_seconds`."""
        self.store = store
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self.ttl = ttl_seconds
        self._clock = clock

    @staticmethod
    def new_id() -> str:
        """A fresh, unguessable conversation id."""
        return uuid.uuid4().hex

    async def _load(self, cid: str) -> list[list[str]]:
        record = await self.store.load_conversation(cid)
        used = _used(record)
        if used is None or used < self._clock() - self.ttl:
            return []  # expired (the store may not have dropped it yet) or not a record of ours
        return _turns(record)[-self.max_turns:]

    async def history(self, cid: str) -> list[dict[str, str]]:
        """The remembered turns of `cid` as OpenAI messages, oldest first ([] when unknown)."""
        messages = []
        for question, answer in await self._load(cid):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages

    async def remember(self, cid: str, question: str, answer: str) -> None:
        """Keep one finished turn; the oldest turns and conversations make room."""
        turns = await self._load(cid)
        turns.append([question, answer])
        record = {"turns": turns[-self.max_turns:], "used": self._clock()}
        await self.store.save_conversation(cid, record, self.ttl, self.max_conversations)
