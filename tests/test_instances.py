"""Several instances on one Redis (issue 17): two real `python app.py` processes, a real redis-server,
and a fake upstream served from this test, all on loopback."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from chatgpt.domain import texts
from tests.conftest import CLIENT_TOKEN, SERVER_KEY
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.capture import SecretCapture
from tests.helpers.redisd import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.helpers.servers import started_port, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "adm-instances-token-4711"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECOND_KEY = "sk-server-key-0002"
SECRET_ENV = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CHATGPT_ADMIN_TOKEN", "BAIXING_API_KEY", "REDIS_URL")
START_SECONDS = 10.0
SPREAD_SECONDS = 1.0  # a change on one instance is seen by every other within this


@dataclass
class Instance:
    """One `python app.py` process sharing the test's Redis."""

    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        """What the process has logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


class Instances:
    """Starts app processes (each in its own folder) on one Redis; kills leftovers, keeps their logs."""

    def __init__(self, folder: Path, redis: RedisServer, upstream_url: str, capture: SecretCapture) -> None:
        self.folder = folder
        self.redis = redis
        self.upstream_url = upstream_url
        self.capture = capture
        self.started: list[Instance] = []

    async def start(self, **sections: dict[str, Any]) -> Instance:
        """Start one more instance and wait until it answers `//status`."""
        folder = self.folder / f"instance-{len(self.started)}"
        folder.mkdir(parents=True)
        raw: dict[str, Any] = {
            "server": {"host": "127.0.0.1"},
            "upstream": {"base_url": self.upstream_url, "api_keys": [SERVER_KEY, SECOND_KEY], "connect_timeout": 2,
                         "read_timeout": 30},
            "limits": {"http_per_second": 1000, "ws_per_minute": 1000},
            "quota": {"daily_questions": 3},
            "ws": {"frame_interval_ms": 0},
            "state": {"file": "state.json", "redis_url": self.redis.url},
            "admin": {"token": ADMIN_TOKEN},
            "api": {"client_tokens": [CLIENT_TOKEN]},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        (folder / "settings.yaml").write_text(json.dumps(raw), encoding="utf-8")
        env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV}
        log = folder / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--config", "settings.yaml",
                                        "--port", "0"], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT)
        instance = Instance(process, "", log)  # kept before the port is known: a failed start is cleaned up
        self.started.append(instance)
        instance.base = f"http://127.0.0.1:{await started_port(process, log, START_SECONDS)}"
        await wait_until_serving(process, instance.base, instance.output, START_SECONDS)
        return instance

    def close(self) -> None:
        """Kill what still runs; hand the logs to the secrets check."""
        for instance in self.started:
            if instance.process.poll() is None:
                instance.process.kill()
                instance.process.wait()
            self.capture.add_lines(instance.output())


@pytest.fixture
async def instances(tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAI,
                    secret_capture: SecretCapture) -> AsyncIterator[Instances]:
    """A factory of app processes on the test's Redis, in front of the fake upstream."""
    secret_capture.add_secret(ADMIN_TOKEN, "tests/test_instances.py")
    started = Instances(tmp_path, redis_server, fake.base_url, secret_capture)  # type: ignore[attr-defined]
    yield started
    started.close()


@pytest.fixture
async def http(secret_capture: SecretCapture) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose answers join the secrets check."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), **secret_capture.session_kwargs()) as s:
        yield s


async def ask(http: aiohttp.ClientSession, instance: Instance, **headers: str) -> tuple[int, Any]:
    """One anonymous (or `Authorization`) /v1 question; its status and JSON body."""
    body = {"messages": [{"role": "user", "content": "hello"}]}
    async with http.post(f"{instance.base}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, await response.json()


async def ask_ws(http: aiohttp.ClientSession, instance: Instance, content: str) -> list[dict[str, Any]]:
    """One anonymous websocket question; every frame up to the last (isDone)."""
    frames: list[dict[str, Any]] = []
    async with http.ws_connect(f"{instance.base}//websocket") as ws:
        await ws.send_json({"conversationId": "c", "isDemo": True, "authType": "api", "authValue": "Bearer ",
                            "content": "", "messages": [{"role": "user", "content": content}]})
        while not frames or not frames[-1].get("isDone"):
            frames.append(await asyncio.wait_for(ws.receive_json(), 10))
    return frames


async def healthz(http: aiohttp.ClientSession, instance: Instance) -> dict[str, Any]:
    """The instance's /healthz body."""
    async with http.get(f"{instance.base}/healthz") as response:
        assert response.status == 200
        return dict(await response.json())


async def within(seconds: float, check: Any) -> float:
    """Await `check()` until it is true; how long that took (fails past `seconds`)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not seen within {seconds} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_two_instances_count_one_daily_quota_and_spread_a_flag_within_a_second(
        instances: Instances, http: aiohttp.ClientSession) -> None:
    first, second = await instances.start(), await instances.start()
    statuses = [(await ask(http, instance))[0] for instance in (first, second, first)]
    assert statuses == [200, 200, 200]
    for instance in (second, first):  # 3 questions a day in all, not 3 per instance
        status, body = await ask(http, instance)
        assert (status, body["error"]["code"]) == (429, "daily_quota_exceeded")
    frames = await ask_ws(http, second, texts.QUOTA_QUERY)
    assert frames[-1]["content"] == "0"

    async with http.post(f"{second.base}/admin/quota/reset", headers=ADMIN, json={}) as response:
        assert (await response.json())["reset"] == 1
    assert (await ask(http, first))[0] == 200  # reset on one instance: reset for all

    async with http.patch(f"{first.base}/admin/runtime", headers=ADMIN, json={"status": "FALSE"}) as response:
        assert response.status == 200

    async def second_in_maintenance() -> bool:
        async with http.get(f"{second.base}//status") as status:
            return (await status.json())["state"] is False
    took = await within(SPREAD_SECONDS, second_in_maintenance)
    print(f"maintenance set on one instance, seen by the other after {took * 1000:.0f} ms")
    async with http.get(f"{second.base}/admin/runtime", headers=ADMIN) as response:
        assert (await response.json())["status"] == "FALSE"
    for instance in instances.started:
        assert (await healthz(http, instance))["redis"] is True
        assert "Traceback" not in instance.output()


async def test_a_chat_conversation_started_on_one_instance_continues_on_the_other(
        instances: Instances, http: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    first, second = await instances.start(), await instances.start()
    trusted = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with http.post(f"{first.base}/chat", json={"content": "remember: apple"}, headers=trusted) as response:
        assert response.status == 200
        cid = response.headers["X-Conversation-Id"]
        answer = (await response.text()).strip()
    async with http.post(f"{second.base}/chat", json={"content": "which fruit?", "conversationId": cid},
                         headers=trusted) as response:
        assert response.status == 200
        await response.read()
    assert fake.chat_requests()[-1].body["messages"] == [
        {"role": "user", "content": "remember: apple"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "which fruit?"}]


async def test_a_key_cooled_by_a_429_on_one_instance_is_not_used_by_the_other(
        instances: Instances, http: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    first, second = await instances.start(), await instances.start()
    trusted = {"Authorization": f"Bearer {CLIENT_TOKEN}"}  # the pool's keys, without the daily quota
    fake.script.append(Fail(429, "slow down", headers={"Retry-After": "60"}))
    status, _ = await ask(http, first, **trusted)
    assert status == 200  # the first key was refused, the question went to the second
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {SERVER_KEY}", f"Bearer {SECOND_KEY}"]

    async def cooling_on_second() -> bool:
        async with http.get(f"{second.base}/admin/keys", headers=ADMIN) as response:
            keys = (await response.json())["keys"]
        return bool(keys[0]["state"] == "cooling" and 55 < keys[0]["until"] <= 60)
    took = await within(SPREAD_SECONDS, cooling_on_second)
    print(f"key cooled on one instance, cooling on the other after {took * 1000:.0f} ms")
    for _ in range(4):
        assert (await ask(http, second, **trusted))[0] == 200
    assert [r.authorization for r in fake.chat_requests()[2:]] == [f"Bearer {SECOND_KEY}"] * 4


async def test_token_usage_of_a_key_is_summed_over_the_instances(
        instances: Instances, http: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    first, second = await instances.start(), await instances.start()
    fake.default = Stream(usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                                 "completion_tokens_details": {"reasoning_tokens": 1}})
    trusted = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    for instance in (first, second, second, first):  # round-robin on each: both keys used twice
        assert (await ask(http, instance, **trusted))[0] == 200
    for instance in (first, second):
        async with http.get(f"{instance.base}/admin/keys", headers=ADMIN) as response:
            rows = (await response.json())["keys"]
        assert [row["tokens_today"] for row in rows] == [
            {"gpt-3.5-turbo": {"prompt": 20, "completion": 8, "reasoning": 2}}] * 2


async def test_wrong_admin_tokens_count_on_every_instance_alike(
        instances: Instances, http: aiohttp.ClientSession) -> None:
    first, second = await instances.start(), await instances.start()
    for instance in (first, second) * 5:  # ten wrong tokens, five on each
        async with http.get(f"{instance.base}/admin/runtime", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
    for instance in (first, second):
        async with http.get(f"{instance.base}/admin/runtime", headers=ADMIN) as response:
            assert response.status == 429


async def metric(http: aiohttp.ClientSession, instance: Instance, name: str) -> float:
    """One unlabelled sample of the instance's /metrics."""
    async with http.get(f"{instance.base}/metrics") as response:
        text = await response.text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not in /metrics"
    return values[0]


async def redis_is(http: aiohttp.ClientSession, instance: Instance, up: bool) -> bool:
    """Whether the instance's /healthz says Redis is `up` (and the status says so too)."""
    health = await healthz(http, instance)
    return bool(health["redis"] is up and health["status"] == ("ok" if up else "degraded"))


async def test_redis_down_with_fail_open_keeps_serving_and_redis_back_is_used_again(
        instances: Instances, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    first, second = await instances.start(), await instances.start()
    assert (await ask(http, first))[0] == 200
    redis_server.stop()
    for instance in (first, second):
        await within(2.0, lambda instance=instance: redis_is(http, instance, False))
    assert [(await ask(http, instance))[0] for instance in (first, second)] == [200, 200]  # counted locally
    assert await metric(http, first, "chatgpt_redis_up") == 0
    assert await metric(http, first, "chatgpt_redis_errors_total") >= 1
    assert "unreachable (ConnectionError): counting locally" in first.output()
    async with http.patch(f"{first.base}/admin/runtime", headers=ADMIN, json={"announcement": "while down"}) as r:
        assert r.status == 200

    await redis_server.start(redis_server.port)  # an empty Redis (no persistence)
    for instance in (first, second):
        await within(2.0, lambda instance=instance: redis_is(http, instance, True))
    assert "reachable again" in first.output() and await metric(http, second, "chatgpt_redis_up") == 1
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        flags = await client.hgetall("chatgpt:flags")
    finally:
        await client.aclose()
    assert set(flags) == {"status", "isDebug", "announcement", "demoChat", "demoLimit"}  # written back

    async def second_sees_the_announcement() -> bool:
        async with http.get(f"{second.base}//announcement") as response:
            return (await response.json()).get("content") == "while down"
    await within(SPREAD_SECONDS, second_sees_the_announcement)
    statuses = [(await ask(http, instance))[0] for instance in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]  # one shared quota again (the restarted Redis starts at 0)


async def test_redis_down_with_fail_closed_refuses_quota_questions_as_busy_until_it_is_back(
        instances: Instances, http: aiohttp.ClientSession, redis_server: RedisServer) -> None:
    first = await instances.start(state={"redis_fail": "closed"})
    redis_server.stop()
    await within(2.0, lambda: redis_is(http, first, False))
    status, _ = await ask(http, first)
    assert status == 503
    async with http.post(f"{first.base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}) as r:
        assert (r.status, r.headers.get("Retry-After")) == (503, "5")
    frames = await ask_ws(http, first, "hello")
    assert [(f["content"], f["isSuccess"]) for f in frames] == [(texts.SERVER_BUSY, False)]
    assert (await ask_ws(http, first, texts.QUOTA_QUERY))[-1]["content"] == texts.SERVER_BUSY
    trusted = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    assert (await ask(http, first, **trusted))[0] == 200  # no shared quota needed: answered
    assert "refusing questions that need the shared quota" in first.output()

    await redis_server.start(redis_server.port)
    await within(2.0, lambda: redis_is(http, first, True))
    assert (await ask(http, first))[0] == 200
    assert (await ask_ws(http, first, texts.QUOTA_QUERY))[-1]["content"] == "2"
