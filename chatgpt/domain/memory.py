"""Server-side memory of `/chat` conversations: ids issued by the server and bound to their caller,
bounded in count, turns and characters, forgotten after a TTL."""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatgpt.domain.question import Payer

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
ID_BYTES = 16  # 128 random bits: an id cannot be guessed, so it cannot be hijacked


def owner_of(identity: str, payer: Payer) -> str:
    """Who a conversation belongs to: the caller's identity and who pays. A caller's own key is kept
    only as a short hash (the state file must never hold a key)."""
    if payer.kind == "own":
        digest = hashlib.sha256((payer.key or "").encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{identity} own:{digest}"
    return f"{identity} {payer.kind}"


@dataclass
class _Conversation:
    owner: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)
    used: float = 0.0


def _size(turn: tuple[str, str]) -> int:
    return len(turn[0]) + len(turn[1])


class ConversationMemory:
    """Turns per conversation id, least recently used forgotten first; no aiohttp in here."""

    def __init__(self, max_conversations: int, max_turns: int, ttl_seconds: float, max_chars: int = 12000,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self.max_chars = max_chars  # upstream.context_chars: older turns could never be sent again
        self.ttl = ttl_seconds
        self._clock = clock
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    @staticmethod
    def new_id() -> str:
        """A fresh, unguessable conversation id (128 random bits)."""
        return secrets.token_hex(ID_BYTES)

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        while self._conversations:
            cid, conversation = next(iter(self._conversations.items()))
            if conversation.used >= cutoff:
                break
            del self._conversations[cid]

    def open(self, cid: str | None, owner: str) -> tuple[str, list[dict[str, str]]]:
        """The id to answer under and its remembered turns as OpenAI messages, oldest first.
        An id that is unknown, expired or not `owner`'s starts a new conversation under a new id."""
        self._expire()
        conversation = self._conversations.get(cid) if cid is not None else None
        if cid is None or conversation is None or conversation.owner != owner:
            return self.new_id(), []
        messages = []
        for question, answer in conversation.turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return cid, messages

    def history(self, cid: str, owner: str) -> list[dict[str, str]]:
        """The remembered turns of `cid` if `owner` holds it, else []."""
        opened, messages = self.open(cid, owner)
        return messages if opened == cid else []

    def remember(self, cid: str, owner: str, question: str, answer: str) -> None:
        """Keep one finished turn; the oldest turns and conversations make room. A turn for an id
        held by someone else is dropped (ids come from `open`, so only a race could ask that)."""
        self._expire()
        conversation = self._conversations.pop(cid, None) or _Conversation(owner)
        if conversation.owner != owner:
            self._conversations[cid] = conversation
            return
        conversation.turns.append((question, answer))
        self._bound(conversation)
        conversation.used = self._clock()
        self._conversations[cid] = conversation
        while len(self._conversations) > self.max_conversations:
            self._conversations.popitem(last=False)

    def _bound(self, conversation: _Conversation) -> None:
        """At most max_turns turns and max_chars characters, the oldest dropped first."""
        turns = conversation.turns
        del turns[:-self.max_turns]
        total = sum(_size(t) for t in turns)
        drop = 0
        while drop < len(turns) and total > self.max_chars:
            total -= _size(turns[drop])
            drop += 1
        del turns[:drop]

    def snapshot(self) -> dict[str, Any]:
        """The conversations for the state file: cheap (the strings are shared, not copied), so it can
        be taken on the event loop and serialised in a thread while the memory goes on changing."""
        self._expire()
        return {cid: {"used": c.used, "owner": c.owner, "turns": list(c.turns)}
                for cid, c in self._conversations.items()}

    def restore(self, data: Any) -> None:
        """Take back saved conversations, skipping anything malformed (or without an owner)."""
        if not isinstance(data, dict):
            return
        for cid, entry in data.items():
            if not (isinstance(cid, str) and CONVERSATION_ID.match(cid) and isinstance(entry, dict)):
                continue
            turns, used, owner = entry.get("turns"), entry.get("used"), entry.get("owner")
            if not isinstance(turns, list) or isinstance(used, bool) or not isinstance(used, (int, float)):
                continue
            if not isinstance(owner, str) or not owner:
                continue  # saved before conversations were bound to their caller: nobody may continue it
            kept = [(q, a) for q, a in (t for t in turns if isinstance(t, list) and len(t) == 2)
                    if isinstance(q, str) and isinstance(a, str)]
            conversation = _Conversation(owner, kept, float(used))
            self._bound(conversation)
            self._conversations[cid] = conversation
        ordered = sorted(self._conversations.items(), key=lambda item: item[1].used)
        self._conversations = OrderedDict(ordered[-self.max_conversations:])
        self._expire()
