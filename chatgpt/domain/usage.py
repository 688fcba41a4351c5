"""Token usage of the server's keys today, per key and model, counted in the store (summed over instances)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatgpt.domain.store import Store

_KINDS = {"prompt": "prompt_tokens", "completion": "completion_tokens"}


def usage_counts(usage: Any) -> dict[str, int]:
    """`{"prompt", "completion", "reasoning"}` token counts from an OpenAI `usage` object (junk dropped)."""
    if not isinstance(usage, dict):
        return {}
    counts = {kind: usage[name] for kind, name in _KINDS.items() if type(usage.get(name)) is int and usage[name] >= 0}
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if type(reasoning) is int and reasoning > 0:
        counts["reasoning"] = reasoning
    return counts


class TokenUsage:
    """Adds a question's tokens to today's totals of its pool key; reads them back for the admin."""

    def __init__(self, store: Store) -> None:
        """Count in `store`."""
        self.store = store

    async def add(self, fingerprint: str, model: str, counts: Mapping[str, int]) -> None:
        """Count one answer's tokens for the key with this fingerprint (keys never reach the store)."""
        if counts:
            await self.store.add_usage(fingerprint, model, counts)

    async def today(self) -> dict[str, dict[str, dict[str, int]]]:
        """Today's totals: {key fingerprint: {model: {kind: tokens}}}."""
        totals: dict[str, dict[str, dict[str, int]]] = {}
        for (fingerprint, model), counts in (await self.store.usage_today()).items():
            totals.setdefault(fingerprint, {})[model] = counts
        return totals
