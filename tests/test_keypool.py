"""Tests for the server's key pool and Retry-After parsing, on a fake clock."""
from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chatgpt.domain import keypool
from chatgpt.domain.keypool import (
    KeyPool,
    fingerprint,
    mask,
    retry_after_from_headers,
    retry_after_seconds,
)
from tests.fakes.clock import FakeClock

KEYS = ["sk-aaaaaaaaaaaaaaaaaaaa1111", "sk-bbbbbbbbbbbbbbbbbbbb2222", "sk-cccccccccccccccccccc3333"]
A, B, C = KEYS


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> KeyPool:
    return KeyPool(KEYS, clock=clock, backoff_seconds=20.0, probe_interval=600.0)


def test_keys_rotate_round_robin(pool: KeyPool) -> None:
    assert [pool.pick() for _ in range(7)] == [A, B, C, A, B, C, A]


def test_duplicate_and_blank_keys_are_dropped_keeping_order() -> None:
    pool = KeyPool([B, "", A, "  ", B, A])
    assert len(pool) == 2
    assert [pool.pick(), pool.pick(), pool.pick()] == [B, A, B]


def test_an_empty_pool_is_falsy_and_picks_nothing() -> None:
    pool = KeyPool([])
    assert not pool and len(pool) == 0 and pool.usable() == 0
    assert pool.pick() is None


def test_a_rate_limited_key_cools_for_retry_after_and_comes_back(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_rate_limited(A, 30.0)
    assert pool.usable() == 2
    assert [pool.pick() for _ in range(4)] == [B, C, B, C]
    assert pool.health()[0]["state"] == "cooling"
    assert pool.health()[0]["until"] == 30.0
    clock.now += 29.9
    assert A not in {pool.pick() for _ in range(3)}
    clock.now += 0.1
    assert A in {pool.pick() for _ in range(3)}
    assert pool.health()[0]["state"] == "healthy"


def test_retry_after_is_clamped_between_one_second_and_an_hour(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_rate_limited(A, 0.0)
    pool.report_rate_limited(B, 99999.0)
    until = [row["until"] for row in pool.health()]
    assert until == [1.0, 3600.0, None]


def test_backoff_without_retry_after_doubles_per_consecutive_429_up_to_an_hour(
    pool: KeyPool,
) -> None:
    seen = []
    for _ in range(10):
        pool.report_rate_limited(A, None)
        seen.append(pool.health()[0]["until"])
    assert seen == [20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 3600.0, 3600.0]


def test_success_resets_the_backoff_and_the_cool_down(pool: KeyPool) -> None:
    pool.report_rate_limited(A, None)
    pool.report_rate_limited(A, None)
    pool.report_success(A)
    assert pool.health()[0]["state"] == "healthy"
    pool.report_rate_limited(A, None)
    assert pool.health()[0]["until"] == 20.0


def test_a_long_429_streak_does_not_overflow(pool: KeyPool) -> None:
    for _ in range(2000):
        pool.report_rate_limited(A, None)
    assert pool.health()[0]["until"] == 3600.0


def test_a_disabled_key_is_skipped_then_probed_after_the_interval_and_healthy_again(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_invalid(B, "insufficient_quota")
    assert [pool.pick() for _ in range(4)] == [A, C, A, C]
    assert pool.health()[1]["state"] == "disabled"
    assert pool.health()[1]["reason"] == "insufficient_quota"
    clock.now += 599.0
    assert pool.due_for_probe() == []
    clock.now += 1.0
    assert pool.due_for_probe() == [B]
    pool.report_probe(B, ok=True)
    assert pool.due_for_probe() == []
    assert pool.health()[1]["state"] == "healthy"
    assert pool.health()[1]["reason"] is None
    assert B in {pool.pick() for _ in range(3)}


def test_a_failed_probe_keeps_the_key_disabled_and_restarts_the_probe_timer(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_invalid(A, "401")
    clock.now += 600.0
    pool.report_probe(A, ok=False)
    assert pool.due_for_probe() == []
    assert pool.health()[0]["state"] == "disabled"
    clock.now += 600.0
    assert pool.due_for_probe() == [A]


def test_success_does_not_re_enable_a_disabled_key(pool: KeyPool) -> None:
    pool.report_invalid(A, "401")
    pool.report_success(A)
    assert pool.health()[0]["state"] == "disabled"


def test_pick_with_exclude_gives_the_next_key(pool: KeyPool) -> None:
    first = pool.pick()
    assert first == A
    assert pool.pick(exclude={first}) == B
    assert pool.pick(exclude=[C]) == A
    assert pool.pick(exclude=KEYS) is None


def test_all_keys_cooling_picks_none(pool: KeyPool) -> None:
    for key in KEYS:
        pool.report_rate_limited(key, 10.0)
    assert pool.usable() == 0
    assert pool.pick() is None
    assert bool(pool) is True


def test_errors_are_counted_but_keep_the_key_usable(pool: KeyPool) -> None:
    pool.record_request(A)
    pool.report_error(A)
    pool.record_request(A)
    pool.report_success(A)
    row = pool.health()[0]
    assert (row["state"], row["requests"], row["failures"]) == ("healthy", 2, 1)
    assert pool.usable() == 3


def test_reports_about_unknown_keys_are_ignored(pool: KeyPool) -> None:
    for report in (pool.report_success, pool.report_error, pool.record_request):
        report("sk-not-in-the-pool-xxxx")
    pool.report_rate_limited("sk-other", 5.0)
    pool.report_invalid("sk-other", "401")
    pool.report_probe("sk-other", ok=True)
    assert pool.usable() == 3


@pytest.mark.parametrize(
    ("key", "shown"),
    [("sk-abcdefghijklmnop1234", "…1234"), ("12345678", "…5678"), ("1234567", "…"),
     ("sk-1", "…"), ("", "…")],
)
def test_mask_never_shows_more_than_four_characters_and_nothing_for_short_keys(
    key: str, shown: str
) -> None:
    assert mask(key) == shown
    assert len(mask(key)) <= 5


def test_health_and_snapshot_never_contain_a_full_key(pool: KeyPool) -> None:
    pool.report_invalid(A, "401")
    pool.report_rate_limited(B, 5.0)
    for key in KEYS:
        pool.record_request(key)
    assert [row["key"] for row in pool.health()] == ["…1111", "…2222", "…3333"]
    for key in KEYS:
        assert key not in repr(pool.health())
        assert key not in json.dumps(pool.snapshot())


def test_health_lists_every_field_per_key_in_order(pool: KeyPool) -> None:
    assert pool.health()[2] == {
        "key": "…3333", "state": "healthy", "until": None, "reason": None,
        "requests": 0, "failures": 0,
    }


def test_snapshot_restore_keeps_a_disabled_key_disabled_and_a_cooling_key_cooling(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_invalid(A, "insufficient_quota")
    pool.report_rate_limited(B, 120.0)
    clock.now += 100.0
    data = json.loads(json.dumps(pool.snapshot()))

    later = FakeClock()
    later.now = 5.0  # a new process: the monotonic clock starts somewhere else
    restored = KeyPool(list(reversed(KEYS)), clock=later, probe_interval=600.0)
    restored.restore(data)
    rows = {row["key"]: row for row in restored.health()}
    assert rows["…1111"]["state"] == "disabled"
    assert rows["…1111"]["reason"] == "insufficient_quota"
    assert rows["…2222"]["state"] == "cooling"
    assert rows["…2222"]["until"] == pytest.approx(20.0)
    assert rows["…3333"]["state"] == "healthy"
    assert restored.pick() == C
    # The probe timer also survives: 100 s were already spent before the restart.
    later.now += 499.0
    assert restored.due_for_probe() == []
    later.now += 1.0
    assert restored.due_for_probe() == [A]


def test_restore_ignores_keys_that_are_no_longer_configured(
    pool: KeyPool, clock: FakeClock
) -> None:
    pool.report_invalid(A, "401")
    fresh = KeyPool([B, C], clock=clock)
    fresh.restore(pool.snapshot())
    assert fresh.usable() == 2


@pytest.mark.parametrize(
    "garbage",
    [None, 42, "x", [], {}, {"version": 1}, {"version": 2, "keys": {}},
     {"version": 1, "keys": []}, {"version": 1, "keys": {"abc": "x"}},
     {"version": 1, "keys": {"__KEY__": {
         "cooling": "soon", "disabled": "yes", "streak": -3, "requests": float("nan"),
         "failures": True, "reason": 7, "since_probe": None}}},
     {"version": 1, "keys": {"__KEY__": None}}],
)
def test_garbage_restore_is_ignored(garbage: object, clock: FakeClock) -> None:
    garbage = copy.deepcopy(garbage)  # parametrize values are shared between runs
    if isinstance(garbage, dict) and isinstance(garbage.get("keys"), dict):
        keys = garbage["keys"]
        if "__KEY__" in keys:
            keys[fingerprint(A)] = keys.pop("__KEY__")
    pool = KeyPool(KEYS, clock=clock)
    pool.restore(garbage)
    assert pool.usable() == 3
    assert [row["state"] for row in pool.health()] == ["healthy"] * 3


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("20", 20.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), (".25", 0.25),
     ("Wed, 01 May 2024 12:00:30 GMT", 30.0), ("Wed, 01 May 2024 11:59:00 GMT", 0.0),
     ("Wed, 01 May 2024 12:01:00 -0000", 60.0)],
)
def test_retry_after_parses_seconds_fractions_and_dates(value: str, seconds: float) -> None:
    assert retry_after_seconds(value, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-5", "nan", "inf", "1e3", "9" * 400, "Wed, 99 Foo 2024",
     "Mon, 01 Jan 99999 00:00:00 GMT"],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert retry_after_seconds(value, now=NOW) is None


def test_retry_after_date_defaults_to_the_wall_clock() -> None:
    assert retry_after_seconds("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0


def test_retry_after_ms_header_wins_over_retry_after_in_any_case() -> None:
    assert retry_after_from_headers({"Retry-After-Ms": "1500", "Retry-After": "9"}) == 1.5
    assert retry_after_from_headers({"retry-after-ms": "250.5"}) == pytest.approx(0.2505)
    assert retry_after_from_headers({"RETRY-AFTER": "9"}) == 9.0
    assert retry_after_from_headers({"retry-after-ms": "junk", "retry-after": "3"}) == 3.0
    assert retry_after_from_headers({"content-type": "application/json"}) is None
    assert retry_after_from_headers({}) is None


def test_the_module_does_not_import_aiohttp() -> None:
    source = Path(keypool.__file__).read_text(encoding="utf-8")
    assert "aiohttp" not in keypool.__dict__
    assert "import aiohttp" not in source and "from aiohttp" not in source


# --- Health shared between instances (issue 17): instants travel as wall-clock epochs ---------------------------

def test_shared_health_moves_a_cool_down_and_a_disable_between_pools_with_different_monotonic_clocks() -> None:
    here, there = FakeClock(), FakeClock()
    here.now, there.now = 50_000.0, 7.0  # two processes, two monotonic clocks; one wall clock
    wall = lambda: 1_700_000_000.0  # noqa: E731
    sender = KeyPool(KEYS, clock=here, wall=wall)
    receiver = KeyPool(list(reversed(KEYS)), clock=there, wall=wall)
    sender.report_rate_limited(A, 30.0)
    sender.report_invalid(B, "invalid_api_key")
    receiver.apply_shared({fingerprint(k): sender.shared_health(k) for k in (A, B)})
    health = {row["key"]: row for row in receiver.health()}
    assert (health[mask(A)]["state"], health[mask(A)]["until"]) == ("cooling", 30.0)
    assert (health[mask(B)]["state"], health[mask(B)]["reason"]) == ("disabled", "invalid_api_key")
    assert receiver.pick() == C and receiver.pick() == C
    sender.report_success(A)
    receiver.apply_shared({fingerprint(A): sender.shared_health(A), "junk": {"cool_until": "x"},
                           fingerprint(C): {"cool_until": float("nan"), "disabled": "yes"}})
    assert {row["key"]: row["state"] for row in receiver.health()} == {
        mask(C): "healthy", mask(B): "disabled", mask(A): "healthy"}
