"""Daily quota: counting, refunds, local-midnight reset, runtime limit and snapshots."""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from chatgpt.domain.quota import DailyQuota
from tests.fakes.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2024, 5, 1, 12, 0, 0))


def test_new_identity_has_the_whole_limit(clock: FakeClock) -> None:
    quota = DailyQuota(3, clock=clock)
    assert quota.remaining("1.2.3.4") == 3
    assert len(quota) == 0


def test_each_question_takes_one_until_none_are_left(clock: FakeClock) -> None:
    quota = DailyQuota(2, clock=clock)
    assert quota.take("ip")
    assert quota.remaining("ip") == 1
    assert quota.take("ip")
    assert quota.remaining("ip") == 0
    assert not quota.take("ip")
    assert quota.remaining("ip") == 0
    assert quota.used("ip") == 2


def test_identities_are_counted_separately(clock: FakeClock) -> None:
    quota = DailyQuota(1, clock=clock)
    assert quota.take("a")
    assert quota.take("b")
    assert not quota.take("a")


def test_refund_gives_one_question_back(clock: FakeClock) -> None:
    quota = DailyQuota(2, clock=clock)
    quota.take("ip")
    quota.take("ip")
    quota.refund("ip")
    assert quota.remaining("ip") == 1
    assert quota.take("ip")


def test_refund_never_goes_below_zero_used(clock: FakeClock) -> None:
    quota = DailyQuota(2, clock=clock)
    quota.refund("ip")
    quota.take("ip")
    quota.refund("ip")
    quota.refund("ip")
    assert quota.remaining("ip") == 2
    assert quota.used("ip") == 0
    assert len(quota) == 0


def test_counters_reset_at_local_midnight(clock: FakeClock) -> None:
    clock.now = datetime(2024, 5, 1, 23, 59, 59)
    quota = DailyQuota(1, clock=clock)
    assert quota.take("ip")
    assert not quota.take("ip")
    clock.now += timedelta(seconds=1)
    assert quota.remaining("ip") == 1
    assert quota.take("ip")


def test_counters_survive_until_midnight(clock: FakeClock) -> None:
    clock.now = datetime(2024, 5, 1, 0, 0, 0)
    quota = DailyQuota(1, clock=clock)
    quota.take("ip")
    clock.now = datetime(2024, 5, 1, 23, 59, 59)
    assert quota.remaining("ip") == 0


def test_refund_after_a_midnight_reset_does_nothing(clock: FakeClock) -> None:
    clock.now = datetime(2024, 5, 1, 23, 59, 0)
    quota = DailyQuota(2, clock=clock)
    quota.take("ip")
    clock.now = datetime(2024, 5, 2, 0, 1, 0)
    quota.refund("ip")
    assert quota.remaining("ip") == 2
    assert len(quota) == 0


def test_lowering_the_limit_at_runtime_takes_effect_at_once(clock: FakeClock) -> None:
    quota = DailyQuota(5, clock=clock)
    for _ in range(3):
        quota.take("ip")
    quota.limit = 2
    assert quota.remaining("ip") == 0
    assert not quota.take("ip")
    quota.limit = 10
    assert quota.remaining("ip") == 7
    assert quota.take("ip")


def test_zero_limit_refuses_everyone(clock: FakeClock) -> None:
    quota = DailyQuota(0, clock=clock)
    assert quota.remaining("ip") == 0
    assert not quota.take("ip")
    assert len(quota) == 0


def test_reset_one_identity_or_all(clock: FakeClock) -> None:
    quota = DailyQuota(3, clock=clock)
    for identity in ("a", "b", "c"):
        quota.take(identity)
    assert quota.reset("a") == 1
    assert quota.reset("a") == 0
    assert quota.remaining("a") == 3
    assert quota.reset() == 2
    assert quota.remaining("b") == 3
    assert len(quota) == 0


def test_snapshot_restore_round_trip_through_json(clock: FakeClock) -> None:
    quota = DailyQuota(5, clock=clock)
    quota.take("a")
    quota.take("b")
    quota.take("b")
    data = json.loads(json.dumps(quota.snapshot()))
    assert data == {"day": "2024-05-01", "used": {"a": 1, "b": 2}}

    restored = DailyQuota(5, clock=clock)
    restored.restore(data)
    assert restored.remaining("a") == 4
    assert restored.remaining("b") == 3
    assert restored.snapshot() == data


def test_restore_of_another_day_is_ignored(clock: FakeClock) -> None:
    quota = DailyQuota(5, clock=clock)
    quota.take("a")
    quota.restore({"day": "2024-04-30", "used": {"a": 5, "b": 5}})
    assert quota.remaining("a") == 4
    assert quota.remaining("b") == 5


@pytest.mark.parametrize(
    "data",
    [
        None,
        "garbage",
        42,
        [],
        {},
        {"day": "2024-05-01"},
        {"day": "2024-05-01", "used": "a=1"},
        {"day": "2024-05-01", "used": [["a", 1]]},
        {"day": 20240501, "used": {"a": 5}},
    ],
)
def test_restore_of_malformed_data_is_ignored(clock: FakeClock, data: Any) -> None:
    quota = DailyQuota(5, clock=clock)
    quota.take("a")
    assert quota.restore(data) is None
    assert quota.snapshot() == {"day": "2024-05-01", "used": {"a": 1}}


def test_restore_keeps_only_positive_integer_counts(clock: FakeClock) -> None:
    quota = DailyQuota(5, clock=clock)
    quota.restore(
        {
            "day": "2024-05-01",
            "used": {"a": 2, "b": -1, "c": "3", "d": True, "e": 1.5, "f": 0, "g": None, "h": 9},
        }
    )
    assert quota.snapshot()["used"] == {"a": 2, "h": 9}
    assert quota.remaining("h") == 0


def test_snapshot_after_midnight_is_empty_for_the_new_day(clock: FakeClock) -> None:
    quota = DailyQuota(5, clock=clock)
    quota.take("a")
    clock.now += timedelta(days=1)
    assert quota.snapshot() == {"day": "2024-05-02", "used": {}}


def test_default_clock_is_local_time() -> None:
    before = datetime.now().date().isoformat()
    day = DailyQuota(1).snapshot()["day"]
    after = datetime.now().date().isoformat()
    assert day in {before, after}  # the call may straddle midnight
