"""Server-side memory of `/chat` conversations: ids issued by the server and bound to their caller,
bounded in count, turns and characters, forgotten after a TTL.

The rules live here; the records live in the store (this process, or Redis for every instance), as
`{"owner": ..., "turns": [[question, answer], ...], "used": <epoch>}`. A record read back is checked like
any outside input: a malformed turn is skipped; an expired record, or one without an owner (saved before
conversations were bound to their caller), is no record.
"""
from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from chatgpt.domain.question import Payer
from chatgpt.domain.store import Store

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
ID_BYTES = 16  # 128 random bits: an id cannot be guessed, so it cannot be hijacked


def owner_of(identity: str, payer: Payer) -> str:
    """Who a conversation belongs to: the caller's identity and who pays. A caller's own key is kept
    only as a short hash (the store must never hold a key)."""
    if payer.kind == "own":
        digest = hashlib.sha256((payer.key or "").encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{identity} own:{digest}"
    return f"{identity} {payer.kind}"


def _turns(record: dict[str, Any]) -> list[list[str]]:
    """The well-formed (question, answer) turns of a stored record."""
    turns = record.get("turns")
    if not isinstance(turns, list):
        return []
    return [[t[0], t[1]] for t in turns
            if isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str) and isinstance(t[1], str)]


def _used(record: dict[str, Any]) -> float | None:
    used = record.get("used")
    if isinstance(used, bool) or not isinstance(used, (int, float)) or not math.isfinite(used):
        return None
    return float(used)


class ConversationMemory:
    """Turns per conversation id, kept in the store; no aiohttp in here."""

    def __init__(self, store: Store, max_conversations: int, max_turns: int, ttl_seconds: float,
                 max_chars: int = 12000, clock: Callable[[], float] = time.time) -> None:
        """At most `max_turns` turns and `max_chars` characters of at most `max_conversations`
        conversations, each kept `ttl_seconds` after its last turn."""
        self.store = store
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self.max_chars = max_chars  # upstream.context_chars: older turns could never be sent again
        self.ttl = ttl_seconds
        self._clock = clock

    @staticmethod
    def new_id() -> str:
        """A fresh, unguessable conversation id (128 random bits)."""
        return secrets.token_hex(ID_BYTES)

    async def _load(self, cid: str) -> tuple[str, list[list[str]]] | None:
        """(owner, bounded turns) of a live record, or None (unknown, expired, malformed, no owner)."""
        record = await self.store.load_conversation(cid)
        if record is None:
            return None
        used, owner = _used(record), record.get("owner")
        if used is None or used < self._clock() - self.ttl or not isinstance(owner, str) or not owner:
            return None  # expired (the store may not have dropped it yet) or not a record of ours
        return owner, self._bound(_turns(record))

    async def open(self, cid: str | None, owner: str) -> tuple[str, list[dict[str, str]]]:
        """The id to answer under and its remembered turns as OpenAI messages, oldest first.
        An id that is unknown, expired or not `owner`'s starts a new conversation under a new id."""
        loaded = await self._load(cid) if cid is not None else None
        if cid is None or loaded is None or loaded[0] != owner:
            return self.new_id(), []
        messages = []
        for question, answer in loaded[1]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return cid, messages

    async def history(self, cid: str, owner: str) -> list[dict[str, str]]:
        """The remembered turns of `cid` if `owner` holds it, else []."""
        opened, messages = await self.open(cid, owner)
        return messages if opened == cid else []

    async def remember(self, cid: str, owner: str, question: str, answer: str) -> None:
        """Keep one finished turn; the oldest turns and conversations make room. A turn for an id
        held by someone else is dropped (ids come from `open`, so only a race could ask that)."""
        loaded = await self._load(cid)
        if loaded is not None and loaded[0] != owner:
            return
        turns = loaded[1] if loaded is not None else []
        turns.append([question, answer])
        record = {"owner": owner, "turns": self._bound(turns), "used": self._clock()}
        await self.store.save_conversation(cid, record, self.ttl, self.max_conversations)

    def _bound(self, turns: list[list[str]]) -> list[list[str]]:
        """At most max_turns turns and max_chars characters, the oldest dropped first."""
        turns = turns[-self.max_turns:]
        total = sum(len(q) + len(a) for q, a in turns)
        drop = 0
        while drop < len(turns) and total > self.max_chars:
            total -= len(turns[drop][0]) + len(turns[drop][1])
            drop += 1
        return turns[drop:]
