"""Per-key rate limiters: refusal over the rate, recovery, idle eviction and the size cap."""
from __future__ import annotations

import asyncio

import pytest

from chatgpt.domain.limits import LimiterTable
from tests.fakes.clock import FakeClock
from tests.helpers.timewarp import skip

EVENT_LOOP = "warp"  # every test here runs on a loop whose clock it moves: aiolimiter drains by the loop's clock


async def test_requests_within_the_rate_are_allowed() -> None:
    table = LimiterTable(2, 0.2)
    assert await table.allow("1.2.3.4")
    assert await table.allow("1.2.3.4")


async def test_request_over_the_rate_is_refused() -> None:
    table = LimiterTable(2, 0.2)
    assert [await table.allow("ip") for _ in range(3)] == [True, True, False]


async def test_refused_key_recovers_after_the_period() -> None:
    table = LimiterTable(2, 0.2)
    for _ in range(3):
        await table.allow("ip")
    skip(0.09)
    assert not await table.allow("ip")  # 2 per 0.2 s: one request's worth drains in 0.1 s
    skip(0.2)
    assert [await table.allow("ip") for _ in range(3)] == [True, True, False]


async def test_one_key_over_the_rate_does_not_limit_another() -> None:
    table = LimiterTable(1, 0.2)
    assert await table.allow("a")
    assert not await table.allow("a")
    assert await table.allow("b")


async def test_allow_does_not_yield_to_other_tasks() -> None:
    table = LimiterTable(100, 1)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    for _ in range(50):
        await table.allow("ip")
    # The other task only gets the loop once this one yields, which allow() never did.
    assert ran == []
    await task
    assert ran == ["other"]


async def test_retry_after_is_zero_for_unknown_or_allowed_keys() -> None:
    table = LimiterTable(2, 0.2)
    assert table.retry_after("nobody") == 0.0
    await table.allow("ip")
    assert table.retry_after("ip") == 0.0


async def test_retry_after_when_refused_is_one_request_worth_of_time() -> None:
    table = LimiterTable(2, 0.2)
    for _ in range(3):
        await table.allow("ip")
    wait = table.retry_after("ip")
    assert wait == pytest.approx(0.1)
    skip(wait * 0.9)
    assert not await table.allow("ip")
    skip(wait * 0.1 + 1e-6)
    assert await table.allow("ip")


async def test_fractional_rate_allows_one_then_spaces_requests() -> None:
    table = LimiterTable(0.5, 0.1)
    assert await table.allow("ip")
    assert not await table.allow("ip")
    assert table.retry_after("ip") == pytest.approx(0.2)
    skip(0.19)
    assert not await table.allow("ip")
    skip(0.011)
    assert await table.allow("ip")


async def test_idle_keys_are_evicted_when_a_new_key_arrives() -> None:
    clock = FakeClock()
    table = LimiterTable(2, 0.2, idle_seconds=60, clock=clock)
    await table.allow("old")
    clock.now += 30
    await table.allow("recent")
    clock.now += 31
    await table.allow("new")
    assert "old" not in table
    assert "recent" in table and "new" in table
    assert len(table) == 2


async def test_evict_idle_reports_how_many_it_removed() -> None:
    clock = FakeClock()
    table = LimiterTable(2, 0.2, idle_seconds=10, clock=clock)
    for key in ("a", "b", "c"):
        await table.allow(key)
    clock.now += 5
    await table.allow("a")
    assert table.evict_idle() == 0
    clock.now += 6
    assert table.evict_idle() == 2
    assert "a" in table and len(table) == 1
    clock.now += 11
    assert table.evict_idle() == 1
    assert len(table) == 0


async def test_ten_thousand_distinct_keys_stay_within_the_size_cap() -> None:
    clock = FakeClock()
    table = LimiterTable(2, 0.2, max_entries=100, clock=clock)
    for i in range(10_000):
        assert await table.allow(f"10.0.{i // 256}.{i % 256}")
        assert len(table) <= 100
    assert len(table) == 100


async def test_size_cap_evicts_the_least_recently_used_key() -> None:
    clock = FakeClock()
    table = LimiterTable(2, 0.2, max_entries=2, clock=clock)
    await table.allow("a")
    await table.allow("b")
    await table.allow("a")  # "a" is now more recent than "b"
    await table.allow("c")
    assert "a" in table and "c" in table and "b" not in table


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rate": 0, "time_period": 1},
        {"max_rate": 1, "time_period": 0},
        {"max_rate": 1, "time_period": 1, "max_entries": 0},
        {"max_rate": 1, "time_period": 1, "idle_seconds": -1},
    ],
)
def test_nonsense_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LimiterTable(**kwargs)


def test_building_a_table_outside_a_loop_creates_no_limiter() -> None:
    table = LimiterTable(2, 0.2)
    assert len(table) == 0
    assert table.retry_after("ip") == 0.0
