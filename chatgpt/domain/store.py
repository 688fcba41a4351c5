"""The store interface: where the state that several instances share lives (in process or in Redis).

Two kinds of state go through it:
- *kept in the store* (daily counters, `/chat` memory, token usage, failure windows, secrets): every
  read and write is a call on the store, so two instances never disagree. These calls are async; the
  in-process store answers them without any I/O.
- *mirrored* (runtime flags, key health): read on every request, so each instance keeps its own copy
  (plain attributes, sync, free to read). A change is applied to the local copy and published; the
  store calls the watchers of every other instance with the new values (Redis: within a second).

Implementations: `chatgpt.server.local_store.LocalStore` (one process, snapshotted to the state file)
and `chatgpt.server.redis_store.RedisStore` (shared). The rules in this package only see `Store`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from typing import Any, Protocol

FlagsWatcher = Callable[[dict[str, Any]], None]
HealthWatcher = Callable[[dict[str, dict[str, Any]]], None]


class StoreUnavailable(Exception):
    """The shared store cannot be reached and `state.redis_fail` is `closed`: refuse, do not guess."""


def next_midnight(now: datetime) -> datetime:
    """The start of the local day after `now` (a naive local time, as `datetime.now()` gives)."""
    return datetime.combine(now.date() + timedelta(days=1), time.min)


def day_of(now: datetime) -> date:
    """The local day a counter taken at `now` belongs to."""
    return now.date()


class Store(Protocol):
    """Every operation the domain's rules need from shared state (see the module docstring)."""

    shared: bool  # True when other instances see the same state

    # --- Daily counters (quotas), per counter name and identity, reset at local midnight ---
    async def take(self, counter: str, identity: str, limit: int) -> bool:
        """Count one for `identity` if it is below `limit` (atomically); False when none is left."""
        ...

    async def refund(self, counter: str, identity: str) -> None:
        """Give one back (never below zero; a refund after midnight gives nothing)."""
        ...

    async def used(self, counter: str, identity: str) -> int:
        """How many `identity` has used today."""
        ...

    async def reset(self, counter: str, identity: str | None = None) -> int:
        """Clear one identity's counter, or all of them; how many were cleared."""
        ...

    # --- Runtime flags (mirrored) ---
    async def publish_flags(self, changes: dict[str, Any]) -> None:
        """Make changed flags (already checked and applied locally) reach every instance."""
        ...

    def watch_flags(self, apply: FlagsWatcher, current: Callable[[], dict[str, Any]]) -> None:
        """`apply(values)` runs when flags change elsewhere; `current()` refills a store that lost them."""
        ...

    # --- Key health (mirrored), one record per key fingerprint, instants as wall-clock epochs ---
    async def publish_key_health(self, fingerprint: str, health: dict[str, Any]) -> None:
        """Make one key's health (cool-down until, disabled and why) reach every instance."""
        ...

    def watch_key_health(self, apply: HealthWatcher) -> None:
        """`apply({fingerprint: health})` runs when key health changes elsewhere."""
        ...

    # --- `/chat` conversations: one JSON-safe record per id, forgotten after `ttl` seconds unused ---
    async def load_conversation(self, cid: str) -> dict[str, Any] | None:
        """The record kept for `cid`, or None (unknown or expired)."""
        ...

    async def save_conversation(self, cid: str, record: dict[str, Any], ttl: float, limit: int) -> None:
        """Keep `record` for `ttl` seconds; past `limit` conversations the least recently saved go."""
        ...

    # --- Token usage today, per key fingerprint and model ---
    async def add_usage(self, fingerprint: str, model: str, counts: Mapping[str, int]) -> None:
        """Add token counts (e.g. {"prompt": 12, "completion": 40}) to today's totals."""
        ...

    async def usage_today(self) -> dict[tuple[str, str], dict[str, int]]:
        """Today's totals: {(fingerprint, model): {kind: tokens}}."""
        ...

    # --- Failures in a sliding window (wrong admin tokens per address), instants as wall-clock epochs ---
    async def add_failure(self, name: str, who: str, at: float, window: float, keep: int) -> None:
        """Record a failure of `who` at `at`; older than `window` seconds are dropped, at most `keep` kept."""
        ...

    async def recent_failures(self, name: str, who: str, since: float) -> list[float]:
        """When `who` failed after `since`, oldest first."""
        ...

    # --- Secrets every instance must agree on (e.g. the signing key of WeChat tokens) ---
    async def secret(self, name: str) -> str:
        """The secret called `name`, created (random, 256 bits, hex) by whichever instance asks first."""
        ...


def counts_of(value: Mapping[str, Any]) -> dict[str, int]:
    """Token counts from outside data: non-negative ints only (bools and junk dropped)."""
    return {str(k): v for k, v in value.items() if type(v) is int and v >= 0}
