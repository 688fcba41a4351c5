"""The server's pool of upstream API keys: rotation, cool-down on 429, disable and re-probe."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from chatgpt.domain.store import Store

log = logging.getLogger(__name__)

MAX_COOLDOWN = 3600.0
_SNAPSHOT_VERSION = 1
# Strict delta-seconds: float() would also accept "nan", "inf", "1e9" and "-3".
_DELTA = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def mask(key: str) -> str:
    """Return the key as shown in logs, admin and metrics: "…" plus its last 4 characters."""
    # Short keys would be mostly revealed by their last 4 characters, so show nothing.
    return "…" + key[-4:] if len(key) >= 8 else "…"


def fingerprint(key: str) -> str:
    """Return the SHA-256 hex digest that identifies a key in persisted state."""
    return hashlib.sha256(key.encode()).hexdigest()


def _number(value: Any, upper: float) -> float | None:
    """Return value as a finite float clamped to [0, upper], or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return min(max(float(value), 0.0), upper)


@dataclass
class _KeyState:
    cool_until: float = 0.0
    streak: int = 0  # consecutive 429s, drives the exponential backoff
    disabled: bool = False
    reason: str | None = None
    probe_from: float = 0.0  # clock() of the disable or the last failed probe
    requests: int = 0
    failures: int = 0


class KeyPool:
    """Round-robin over healthy keys; 429 cools a key, 401/no quota disables it until a probe."""

    def __init__(self, keys: Sequence[str], *, clock: Callable[[], float] = time.monotonic,
                 backoff_seconds: float = 20.0, probe_interval: float = 600.0, store: Store | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        """Keep the distinct non-blank keys in their given order; with a shared store, every instance
        sees a key's cool-down or disable (the store carries instants as `wall` epochs)."""
        self._clock = clock
        self._wall = wall
        self._store = store if store is not None and store.shared else None
        self._publishing: set[asyncio.Task[None]] = set()
        self._backoff = backoff_seconds
        self.probe_interval = probe_interval
        # A dict keeps insertion order and drops duplicates in one step.
        self._states = {k: _KeyState() for k in (key.strip() for key in keys) if k}
        self._keys = list(self._states)
        self._by_fingerprint = {fingerprint(key): key for key in self._keys}
        self._cursor = 0
        if self._store is not None:
            self._store.watch_key_health(self.apply_shared)

    def __len__(self) -> int:
        """Return how many keys are configured."""
        return len(self._keys)

    def __bool__(self) -> bool:
        """Return True when any key is configured, usable or not."""
        return bool(self._keys)

    def fingerprints(self) -> list[str]:
        """The keys' fingerprints in configured order (the order of `health()`)."""
        return list(self._by_fingerprint)

    def _usable(self, state: _KeyState, now: float) -> bool:
        return not state.disabled and state.cool_until <= now

    def usable(self) -> int:
        """Return how many keys are healthy now."""
        now = self._clock()
        return sum(self._usable(s, now) for s in self._states.values())

    def wait(self) -> float | None:
        """Seconds until the first cooling key is usable again; None when no key is cooling."""
        now = self._clock()
        waits = [s.cool_until - now for s in self._states.values() if not s.disabled and s.cool_until > now]
        return min(waits) if waits else None

    def pick(self, exclude: Collection[str] = ()) -> str | None:
        """Return the next healthy key not in exclude (round-robin), or None when none is usable."""
        now = self._clock()
        count = len(self._keys)
        for step in range(count):
            index = (self._cursor + step) % count
            key = self._keys[index]
            if key not in exclude and self._usable(self._states[key], now):
                self._cursor = index + 1
                return key
        return None

    def record_request(self, key: str) -> None:
        """Count one upstream request made with key."""
        if state := self._states.get(key):
            state.requests += 1

    def report_success(self, key: str) -> None:
        """Clear the key's 429 streak and cool-down (a disabled key waits for its probe)."""
        if (state := self._states.get(key)) and (state.streak or state.cool_until):
            state.streak = 0
            state.cool_until = 0.0
            self._publish(key)

    def report_rate_limited(self, key: str, retry_after: float | None) -> None:
        """Cool the key for Retry-After seconds, or an exponential backoff without one."""
        if not (state := self._states.get(key)):
            return
        state.failures += 1
        state.streak += 1
        if retry_after is not None and math.isfinite(retry_after):
            # At least 1 s so a "0" does not hammer the upstream; at most an hour.
            delay = min(max(retry_after, 1.0), MAX_COOLDOWN)
        else:
            # The exponent is capped so a long streak cannot overflow the float.
            delay = min(self._backoff * 2.0 ** min(state.streak - 1, 32), MAX_COOLDOWN)
        state.cool_until = self._clock() + delay
        self._publish(key)

    def report_invalid(self, key: str, reason: str) -> None:
        """Disable the key (401 or insufficient_quota) until a later probe succeeds."""
        if not (state := self._states.get(key)):
            return
        state.failures += 1
        state.disabled = True
        state.reason = reason
        state.probe_from = self._clock()
        self._publish(key)

    def report_error(self, key: str) -> None:
        """Count a 5xx or network failure; the key stays usable since the fault is not its own."""
        if state := self._states.get(key):
            state.failures += 1

    def due_for_probe(self) -> list[str]:
        """Return the disabled keys whose last disable or probe is at least probe_interval ago."""
        now = self._clock()
        return [key for key, s in self._states.items()
                if s.disabled and now - s.probe_from >= self.probe_interval]

    def report_probe(self, key: str, ok: bool) -> None:
        """Re-enable the key after a good probe; otherwise restart its probe timer."""
        if not (state := self._states.get(key)):
            return
        if ok:
            state.disabled, state.reason, state.streak, state.cool_until = False, None, 0, 0.0
        else:
            state.probe_from = self._clock()
        self._publish(key)

    def _publish(self, key: str) -> None:
        """Send the key's new health to every instance (shared store only), without waiting for it."""
        if self._store is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): nobody to tell
            return
        task = loop.create_task(self._send(fingerprint(key), self.shared_health(key)))
        self._publishing.add(task)  # a strong reference until it is done
        task.add_done_callback(self._publishing.discard)

    async def _send(self, fp: str, health: dict[str, Any]) -> None:
        assert self._store is not None
        try:
            await self._store.publish_key_health(fp, health)
        except Exception:  # the store keeps it to retry; this task must not die noisily
            log.exception("key health of %s not published", fp[:8])

    def shared_health(self, key: str) -> dict[str, Any]:
        """The key's health as the store keeps it: instants as wall-clock epochs (monotonic clocks differ
        between processes)."""
        state = self._states[key]
        offset = self._wall() - self._clock()
        return {"cool_until": state.cool_until + offset if state.cool_until else 0.0, "streak": state.streak,
                "disabled": state.disabled, "reason": state.reason,
                "probe_from": state.probe_from + offset if state.disabled else 0.0}

    def apply_shared(self, records: dict[str, dict[str, Any]]) -> None:
        """Take key health published by any instance; malformed records and unknown keys are ignored."""
        offset = self._clock() - self._wall()
        for fp, record in records.items():
            key = self._by_fingerprint.get(fp)
            if key is None or not isinstance(record, dict):
                continue
            state = self._states[key]
            cool_until = _number(record.get("cool_until"), 2.0**40)
            if cool_until is not None:
                state.cool_until = cool_until + offset if cool_until > self._wall() else 0.0
            if (streak := _number(record.get("streak"), 64)) is not None:
                state.streak = int(streak)
            if isinstance(record.get("disabled"), bool):
                state.disabled = record["disabled"]
                reason = record.get("reason")
                state.reason = (reason[:200] if isinstance(reason, str) else "disabled") if state.disabled else None
                if (probe_from := _number(record.get("probe_from"), 2.0**40)) is not None and state.disabled:
                    state.probe_from = probe_from + offset

    def health(self) -> list[dict[str, Any]]:
        """Return one masked status dict per key, in configured order."""
        now = self._clock()
        rows = []
        for key, s in self._states.items():
            cooling = s.cool_until > now
            state = "disabled" if s.disabled else "cooling" if cooling else "healthy"
            until = round(s.cool_until - now, 3) if cooling else None
            rows.append({"key": mask(key), "state": state, "until": until, "reason": s.reason,
                         "requests": s.requests, "failures": s.failures})
        return rows

    def snapshot(self) -> dict[str, Any]:
        """Return JSON-safe per-key health keyed by fingerprint, never by the key itself."""
        now = self._clock()
        # Monotonic clocks restart with the process, so store durations, not instants.
        keys = {fingerprint(key): {
            "cooling": max(s.cool_until - now, 0.0), "streak": s.streak,
            "disabled": s.disabled, "reason": s.reason,
            "since_probe": max(now - s.probe_from, 0.0) if s.disabled else 0.0,
            "requests": s.requests, "failures": s.failures,
        } for key, s in self._states.items()}
        return {"version": _SNAPSHOT_VERSION, "keys": keys}

    def restore(self, data: Any) -> None:
        """Apply a snapshot(); malformed entries and keys no longer configured are ignored."""
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or data.get("version") != _SNAPSHOT_VERSION:
            return
        now = self._clock()
        for key, state in self._states.items():
            entry = entries.get(fingerprint(key))
            if isinstance(entry, dict):
                self._restore_one(state, entry, now)

    def _restore_one(self, state: _KeyState, entry: dict[str, Any], now: float) -> None:
        if (cooling := _number(entry.get("cooling"), MAX_COOLDOWN)) is not None:
            state.cool_until = now + cooling if cooling > 0 else 0.0
        for name in ("streak", "requests", "failures"):
            if (count := _number(entry.get(name), 2.0**53)) is not None:
                setattr(state, name, int(count))
        if entry.get("disabled") is True:
            state.disabled = True
            reason = entry.get("reason")
            state.reason = reason if isinstance(reason, str) else "restored"
            since = _number(entry.get("since_probe"), self.probe_interval) or 0.0
            state.probe_from = now - since


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP-date) to seconds >= 0, else None."""
    text = (value or "").strip()
    if _DELTA.fullmatch(text):
        seconds = float(text)  # a few hundred digits overflow to inf: treat that as garbage
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no zone information
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max((when - current).total_seconds(), 0.0)


def retry_after_from_headers(headers: Mapping[str, str], *,
                             now: datetime | None = None) -> float | None:
    """Return the wait an upstream asks for: retry-after-ms first, then retry-after."""
    # Lower-case ourselves so a plain dict works as well as a case-insensitive multidict.
    lowered = {name.lower(): val for name, val in headers.items()}
    millis = (lowered.get("retry-after-ms") or "").strip()
    if _DELTA.fullmatch(millis) and math.isfinite(seconds := float(millis) / 1000.0):
        return seconds
    return retry_after_seconds(lowered.get("retry-after"), now=now)


async def probe_forever(pool: KeyPool, verify: Callable[[str], Awaitable[bool]], every: float) -> None:
    """Background task: re-probe disabled keys that are due; a good probe puts a key back in rotation."""
    while True:
        await asyncio.sleep(every)
        for key in pool.due_for_probe():
            pool.report_probe(key, await verify(key))
