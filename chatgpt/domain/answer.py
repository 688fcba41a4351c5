"""What counts as an answer, and the ids the server gives answers."""
from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncGenerator, Awaitable

from chatgpt.domain.provider import Delta
from chatgpt.domain.wordfilter import WordFilter

_PROCESS = secrets.token_hex(6)  # a restarted process does not repeat the ids of the last one
_COUNTER = itertools.count(1)


def produced(delta: Delta) -> bool:
    """True when a delta carries something of an answer: text, reasoning or a piece of a tool call."""
    return bool(delta.text or delta.reasoning or delta.tool_call)


def new_answer_id() -> str:
    """`chatcmpl-<hex>`: unique for the life of the process (a counter behind a per-process random
    prefix), so two answers never share an id even when the upstream repeats or omits its own."""
    return f"chatcmpl-{_PROCESS}{next(_COUNTER):08x}"


class Answer:
    """The deltas of one answer in batches (never empty; those that arrived together, as the provider
    gave them), the model the pipeline chose for it (PROTOCOL.md E.1), and the word list every door must
    mask its text with before a client sees it (None: nothing to mask; PROTOCOL.md E.5). Deltas carry
    the upstream's text: each door masks in its own way (cumulative text on the websocket, a held-back
    tail on streamed HTTP)."""

    def __init__(self, model: str, deltas: AsyncGenerator[list[Delta], None], words: WordFilter | None = None) -> None:
        self.model = model
        self._deltas = deltas
        self.words = words

    def __aiter__(self) -> Answer:
        return self

    def __anext__(self) -> Awaitable[list[Delta]]:
        return self._deltas.__anext__()  # the generator's own awaitable: no extra coroutine per batch

    async def aclose(self) -> None:
        """Stop the answer: the upstream request is cancelled and the question accounted."""
        await self._deltas.aclose()
