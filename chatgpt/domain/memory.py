"""Server-side memory of `/chat` conversations: bounded in count and turns, forgotten after a TTL."""
from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass
class _Conversation:
    turns: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)
    used: float = 0.0


class ConversationMemory:
    """Turns per conversation id, least recently used forgotten first; no aiohttp in here."""

    def __init__(self, max_conversations: int, max_turns: int, ttl_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self.ttl = ttl_seconds
        self._clock = clock
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    @staticmethod
    def new_id() -> str:
        """A fresh, unguessable conversation id."""
        return uuid.uuid4().hex

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        while self._conversations:
            cid, conversation = next(iter(self._conversations.items()))
            if conversation.used >= cutoff:
                break
            del self._conversations[cid]

    def history(self, cid: str) -> list[dict[str, str]]:
        """The remembered turns of `cid` as OpenAI messages, oldest first ([] when unknown)."""
        self._expire()
        conversation = self._conversations.get(cid)
        if conversation is None:
            return []
        messages = []
        for question, answer in conversation.turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages

    def remember(self, cid: str, question: str, answer: str) -> None:
        """Keep one finished turn; the oldest turns and conversations make room."""
        self._expire()
        conversation = self._conversations.pop(cid, None) or _Conversation()
        conversation.turns.append((question, answer))
        del conversation.turns[:-self.max_turns]
        conversation.used = self._clock()
        self._conversations[cid] = conversation
        while len(self._conversations) > self.max_conversations:
            self._conversations.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe conversations for the state file."""
        self._expire()
        return {cid: {"used": c.used, "turns": [list(t) for t in c.turns]} for cid, c in self._conversations.items()}

    def restore(self, data: Any) -> None:
        """Take back saved conversations, skipping anything malformed."""
        if not isinstance(data, dict):
            return
        for cid, entry in data.items():
            if not (isinstance(cid, str) and CONVERSATION_ID.match(cid) and isinstance(entry, dict)):
                continue
            turns, used = entry.get("turns"), entry.get("used")
            if not isinstance(turns, list) or isinstance(used, bool) or not isinstance(used, (int, float)):
                continue
            kept = [(q, a) for q, a in (t for t in turns if isinstance(t, list) and len(t) == 2)
                    if isinstance(q, str) and isinstance(a, str)]
            self._conversations[cid] = _Conversation(kept[-self.max_turns:], float(used))
        ordered = sorted(self._conversations.items(), key=lambda item: item[1].used)
        self._conversations = OrderedDict(ordered[-self.max_conversations:])
        self._expire()
