"""The Redis store against a real redis-server: atomic day counters, flags spread to every instance,
conversations, usage, failure windows, secrets, and what happens while Redis is down."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from chatgpt.domain.store import StoreUnavailable, next_midnight
from chatgpt.server.local_store import LocalStore
from chatgpt.server.metrics import Metrics
from chatgpt.server.redis_store import RedisStore, redacted
from tests.helpers.redisd import RedisServer, redis_server  # noqa: F401 (a fixture)


class Clock:
    """A settable local time (days) for both stores of a test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client, to look at what the store wrote."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """Stores on the test's Redis (several of them play several instances), closed after the test."""
    made: list[RedisStore] = []

    async def make(fail: str = "open", clock: Callable[[], datetime] = datetime.now, start: bool = True,
                   metrics: Metrics | None = None) -> RedisStore:
        store = RedisStore(redis_server.url, fail, LocalStore(clock=clock), clock=clock, metrics=metrics,
                           poll_seconds=3600)  # the tests call sync() themselves
        made.append(store)
        if start:
            await store.start()
        return store

    yield make
    for store in made:
        await store.close()


async def test_two_instances_share_one_day_counter_and_never_pass_the_limit(make_store: Any) -> None:
    first, second = await make_store(), await make_store()
    takes = [store.take("quota", "1.2.3.4", 20) for _ in range(25) for store in (first, second)]
    results = await asyncio.gather(*takes)
    assert results.count(True) == 20
    assert await first.used("quota", "1.2.3.4") == await second.used("quota", "1.2.3.4") == 20
    assert await second.used("quota", "5.6.7.8") == 0


async def test_a_counter_expires_at_the_next_local_midnight_and_a_new_day_starts_at_zero(
        make_store: Any, raw: Redis) -> None:
    clock = Clock(datetime.now())
    store = await make_store(clock=clock)
    assert await store.take("quota", "id", 1)
    assert not await store.take("quota", "id", 1)
    (key,) = [k async for k in raw.scan_iter(match="chatgpt:q:*")]
    assert await raw.expiretime(key) == int(next_midnight(clock.now).timestamp())
    clock.now += timedelta(days=1)
    assert await store.used("quota", "id") == 0
    assert await store.take("quota", "id", 1)


async def test_a_refund_gives_one_back_and_never_goes_below_zero(make_store: Any) -> None:
    store = await make_store()
    await store.take("quota", "id", 5)
    await store.take("quota", "id", 5)
    await store.refund("quota", "id")
    assert await store.used("quota", "id") == 1
    await store.refund("quota", "id")
    await store.refund("quota", "id")
    assert await store.used("quota", "id") == 0


async def test_reset_clears_one_identity_or_everyone_of_one_counter(make_store: Any) -> None:
    store = await make_store()
    for identity in ("a", "b", "c"):
        await store.take("quota", identity, 5)
    await store.take("debug_quota", "a", 5)
    assert await store.reset("quota", "a") == 1
    assert await store.reset("quota", "nobody") == 0
    assert await store.reset("quota") == 2
    assert [await store.used("quota", i) for i in "abc"] == [0, 0, 0]
    assert await store.used("debug_quota", "a") == 1


async def test_a_flag_published_by_one_instance_reaches_the_others(make_store: Any) -> None:
    first, second = await make_store(), await make_store()
    seen: list[dict[str, Any]] = []
    first.watch_flags(lambda values: None, lambda: {"status": "TRUE", "announcement": ""})
    second.watch_flags(seen.append, lambda: {"status": "TRUE", "announcement": ""})
    await second.sync()
    await first.publish_flags({"status": "FALSE"})
    seen.clear()
    await second.sync()
    assert seen == [{"status": "FALSE", "announcement": ""}]
    seen.clear()
    await second.sync()
    assert seen == []  # nothing changed: nothing pulled


async def test_flags_missing_from_an_emptied_redis_are_written_back_from_the_instance(
        make_store: Any, raw: Redis) -> None:
    store = await make_store()
    store.watch_flags(lambda values: None, lambda: {"status": "FALSE", "demoLimit": 7})
    await store.sync()
    assert await raw.hgetall("chatgpt:flags") == {"status": '"FALSE"', "demoLimit": "7"}
    await raw.flushall()
    await store.sync()
    assert await raw.hgetall("chatgpt:flags") == {"status": '"FALSE"', "demoLimit": "7"}


async def test_conversations_are_shared_expire_and_stay_within_their_count(make_store: Any, raw: Redis) -> None:
    first, second = await make_store(), await make_store()
    for n in range(4):
        await first.save_conversation(f"c{n}", {"turns": [[f"q{n}", f"a{n}"]]}, ttl=60, limit=3)
    assert await second.load_conversation("c0") is None  # the oldest made room
    assert await second.load_conversation("c3") == {"turns": [["q3", "a3"]]}
    assert 59_000 < await raw.pttl("chatgpt:chat:c3") <= 60_000
    await raw.set("chatgpt:chat:junk", "[1, 2]")
    assert await second.load_conversation("junk") is None


async def test_usage_failures_and_secrets_are_the_same_for_every_instance(make_store: Any) -> None:
    first, second = await make_store(), await make_store()
    await first.add_usage("f" * 64, "gpt-x", {"prompt": 10, "completion": 5})
    await second.add_usage("f" * 64, "gpt-x", {"prompt": 1})
    assert await first.usage_today() == {("f" * 64, "gpt-x"): {"prompt": 11, "completion": 5}}
    for at, store in ((1000.0, first), (1010.0, second), (1020.0, first), (1030.0, second)):
        await store.add_failure("admin", "1.2.3.4", at, window=60, keep=3)
    assert await first.recent_failures("admin", "1.2.3.4", since=0) == [1010.0, 1020.0, 1030.0]  # the newest 3
    assert await second.recent_failures("admin", "1.2.3.4", since=1010.0) == [1020.0, 1030.0]
    assert await second.recent_failures("admin", "5.6.7.8", since=0) == []
    secret = await first.secret("wechat")
    assert len(secret) == 64 and await second.secret("wechat") == secret


async def test_redis_down_with_fail_open_counts_locally_and_comes_back_without_a_restart(
        make_store: Any, redis_server: RedisServer, raw: Redis) -> None:
    metrics = Metrics()
    store = await make_store("open", metrics=metrics)
    store.watch_flags(lambda values: None, lambda: {"status": "TRUE"})
    await store.sync()
    assert store.up and metrics.registry.get_sample_value("chatgpt_redis_up") == 1
    redis_server.stop()
    assert await store.take("quota", "id", 1)  # Redis is gone: the local store counts
    assert not store.up
    assert metrics.registry.get_sample_value("chatgpt_redis_up") == 0
    assert metrics.registry.get_sample_value("chatgpt_redis_errors_total") == 1
    assert not await store.take("quota", "id", 1)
    await store.publish_flags({"status": "FALSE"})  # changed while down: kept to write later
    await redis_server.start(redis_server.port)
    await store.sync()
    assert store.up
    assert await raw.hgetall("chatgpt:flags") == {"status": '"FALSE"'}
    assert await store.take("quota", "id", 1)  # Redis again (empty after its restart)


async def test_redis_down_with_fail_closed_refuses_the_quota_but_not_the_rest(
        make_store: Any, redis_server: RedisServer) -> None:
    store = await make_store("closed")
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await store.take("quota", "id", 5)
    with pytest.raises(StoreUnavailable):
        await store.used("quota", "id")
    await store.save_conversation("c", {"turns": []}, ttl=60, limit=5)  # memory falls back to this instance
    assert await store.load_conversation("c") == {"turns": []}


async def test_a_store_started_while_redis_is_down_connects_when_it_comes_up(
        make_store: Any, redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.stop()
    store = await make_store("closed")
    assert not store.up
    with pytest.raises(StoreUnavailable):
        await store.take("quota", "id", 5)
    await redis_server.start(port)
    await store.sync()
    assert store.up and await store.take("quota", "id", 5)


def test_logs_show_the_redis_url_without_its_password() -> None:
    assert redacted("redis://user:s3cret-pass@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert redacted("rediss://:pw@h/0") == "rediss://h/0"


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait (on the loop) until `check()` holds; fail after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not seen in time"
        await asyncio.sleep(0.01)


async def test_a_change_notice_makes_the_other_instance_pull_without_waiting_for_its_poll(
        make_store: Any) -> None:
    first, second = await make_store(), await make_store()  # both poll once an hour: only the notice can do it
    seen: list[dict[str, Any]] = []
    second.watch_flags(seen.append, lambda: {"status": "TRUE"})
    await second.sync()
    await asyncio.sleep(0.2)  # the listener has subscribed
    await first.publish_flags({"status": "FALSE"})
    await until(lambda: {"status": "FALSE"} in seen)


async def test_a_change_without_a_notice_is_still_pulled_by_the_poll(redis_server: RedisServer, raw: Redis) -> None:
    store = RedisStore(redis_server.url, "open", LocalStore(), poll_seconds=0.05)
    seen: list[dict[str, Any]] = []
    store.watch_flags(seen.append, lambda: {"status": "TRUE"})
    await store.start()
    try:
        await raw.hset("chatgpt:flags", "status", '"FALSE"')  # as if the notice had been lost
        await raw.incr("chatgpt:flags:v")
        await until(lambda: {"status": "FALSE"} in seen)
    finally:
        await store.close()


async def test_closing_while_change_notices_arrive_never_hangs(redis_server: RedisServer) -> None:
    # A cancellation landing while redis-py ran a command used to come back as a connection error:
    # the sync loop took it for Redis going down and waited for the next notice for ever (~1 round
    # in 20 of this). Each round must close within seconds.
    for _ in range(40):
        stores = [RedisStore(redis_server.url, "open", LocalStore(), poll_seconds=3600) for _ in range(2)]
        for store in stores:
            await store.start()
        stores[0].watch_flags(lambda values: None, lambda: {"status": "TRUE"})
        stores[1].watch_flags(lambda values: None, lambda: {"status": "TRUE"})
        await stores[1].sync()
        await stores[0].publish_flags({"status": "FALSE"})
        await stores[1].sync()
        async with asyncio.timeout(5):
            for store in stores:
                await store.close()
