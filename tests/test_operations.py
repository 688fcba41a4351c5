"""Operations (PROTOCOL.md B.3, issue 5): `/metrics`, `/healthz` and the one log line per question."""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chatgpt.domain import texts
from chatgpt.server.metrics import hashed
from tests.conftest import CLIENT_TOKEN, SERVER_KEY, USER_KEY, MakeClient, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer
from tests.helpers.servers import refusing_port
from tests.test_settings import serve_until_status

ADMIN_TOKEN = "adm-ops-secret-777"
TRUSTED = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
IMAGE_NAME = "0123456789abcdef0123456789abcdef.png"
IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 92  # 100 bytes
QUESTION_LINE = re.compile(r"^question entry=(\w+) kind=(\w+) who=([0-9a-f]{12}) outcome=(\w+) deltas=(\d+) "
                           r"reads=(\d+) first_ms=(\d+|-) ms=(\d+) prompt_tokens=(\d+|-) "
                           r"completion_tokens=(\d+|-)( prompt=.*)?$")
HEALTH_KEYS = {"status", "uptime_s", "provider", "serving", "keys", "upstream_reachable"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def answered(request: Awaitable[ClientResponse]) -> int:
    """The status of a request whose answer was read to its end: a streamed question is accounted (its
    log line, metrics, reachability) when its answer ends, not when its headers arrive."""
    response = await request
    await response.read()
    return response.status


def v1_body(prompt: str = "Hi") -> dict[str, Any]:
    """A minimal non-streamed chat completion request."""
    return {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": prompt}]}


async def scrape(client: TestClient) -> tuple[str, Samples]:
    """`GET /metrics`: the raw text and every sample keyed by (name, labels)."""
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (KeyError when the series does not exist)."""
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one sample name, by labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def labels(**values: str) -> frozenset[tuple[str, str]]:
    """A label set as `series` keys it."""
    return frozenset(values.items())


async def healthz(client: TestClient) -> dict[str, Any]:
    """`GET /healthz`: 200 with its JSON body."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == HEALTH_KEYS
    assert isinstance(body["uptime_s"], (int, float)) and body["uptime_s"] >= 0
    return dict(body)


def question_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records of the per-question logger."""
    return [r for r in caplog.records if r.name == "chatgpt.questions"]


# --- /metrics -----------------------------------------------------------------------------------------------------

async def test_metrics_is_prometheus_text_in_the_classic_format(client: TestClient) -> None:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await response.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"chatgpt_questions", "chatgpt_streams_in_flight", "chatgpt_time_to_first_token_seconds",
            "chatgpt_answer_duration_seconds", "chatgpt_upstream_errors", "chatgpt_limiter_refusals",
            "chatgpt_quota_refusals", "chatgpt_images_on_disk", "chatgpt_images_on_disk_bytes",
            "chatgpt_websocket_connections"} <= names


async def test_metrics_count_questions_refusals_errors_images_and_sockets(
        make_client: MakeClient, fake: FakeOpenAI, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / IMAGE_NAME).write_bytes(IMAGE_BYTES)  # found by the one scan at start
    (tmp_path / "images" / "not-ours.png").write_bytes(b"x" * 50)  # not a name this server saves: not counted
    client = await make_client(quota={"daily_questions": 1}, limits={"ws_per_minute": 1}, admin={"token": ADMIN_TOKEN})
    async with ws_connect(client) as ws:
        await ws.send_json(question())  # anonymous: uses the one daily question of 127.0.0.1
        assert (await receive_answer(ws))[-1]["content"] == "DONE"
        await ws.send_json(question())  # over ws_per_minute 1
        assert [f["content"] for f in await receive_answer(ws)] == [texts.WS_TOO_FAST]
        _, during = await scrape(client)
    response = await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)
    assert response.status == 200
    response = await client.post("/v1/chat/completions", json=v1_body())  # anonymous, quota used up
    assert response.status == 429
    fake.script.append(Fail(500, "upstream is down"))
    response = await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)
    assert response.status == 502
    assert (await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).status == 200
    text, after = await scrape(client)

    assert value(during, "chatgpt_websocket_connections") == 1.0
    assert series(after, "chatgpt_questions_total") == {
        labels(entry="ws", kind="chat", outcome="ok"): 1.0,
        labels(entry="v1", kind="chat", outcome="ok"): 1.0,
        labels(entry="v1", kind="chat", outcome="quota"): 1.0,
        labels(entry="v1", kind="chat", outcome="upstream_error"): 1.0,
    }
    assert value(after, "chatgpt_time_to_first_token_seconds_count", entry="ws") == 1.0
    assert value(after, "chatgpt_time_to_first_token_seconds_count", entry="v1") == 1.0
    assert value(after, "chatgpt_answer_duration_seconds_count", entry="v1") == 3.0
    assert series(after, "chatgpt_upstream_errors_total") == {labels(upstream="default", status="500", key="…0001"): 1.0}
    assert series(after, "chatgpt_quota_refusals_total") == {labels(entry="v1"): 1.0}
    assert series(after, "chatgpt_limiter_refusals_total") == {labels(entry="ws"): 1.0}
    assert value(after, "chatgpt_images_on_disk") == 1.0
    assert value(after, "chatgpt_images_on_disk_bytes") == float(len(IMAGE_BYTES))
    assert value(after, "chatgpt_streams_in_flight") == 0.0
    assert SERVER_KEY not in text and ADMIN_TOKEN not in text and CLIENT_TOKEN not in text


async def test_websocket_connections_fall_back_to_zero_when_sockets_close(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json({"heart": "ping"})
        await ws.receive_json()
        _, samples = await scrape(client)
        assert value(samples, "chatgpt_websocket_connections") == 1.0
    for _ in range(50):  # the server notices the close a moment after the client
        _, samples = await scrape(client)
        if value(samples, "chatgpt_websocket_connections") == 0.0:
            break
        await asyncio.sleep(0.02)
    assert value(samples, "chatgpt_websocket_connections") == 0.0


async def test_a_stream_being_answered_is_in_flight(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(pieces=["slow"], hang=True))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        assert (await asyncio.wait_for(ws.receive_json(), 5))["content"] == "slow"
        _, samples = await scrape(client)
        assert value(samples, "chatgpt_streams_in_flight") == 1.0
    for _ in range(50):
        _, samples = await scrape(client)
        if value(samples, "chatgpt_streams_in_flight") == 0.0:
            break
        await asyncio.sleep(0.02)
    assert value(samples, "chatgpt_streams_in_flight") == 0.0
    assert value(samples, "chatgpt_questions_total", entry="ws", kind="chat", outcome="client_left") == 1.0


async def test_http_limiter_refusals_are_counted_too(make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 1})
    assert (await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)).status == 200
    assert (await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)).status == 429
    _, samples = await scrape(client)
    assert series(samples, "chatgpt_limiter_refusals_total") == {labels(entry="v1"): 1.0}


async def test_metrics_and_healthz_are_not_rate_limited(make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 1})
    for _ in range(5):
        await scrape(client)
        await healthz(client)


# --- /healthz -----------------------------------------------------------------------------------------------------

async def test_healthz_before_any_question_does_not_know_the_upstream(client: TestClient) -> None:
    body = await healthz(client)
    assert {k: v for k, v in body.items() if k != "uptime_s"} == {
        "status": "ok", "provider": "openai", "serving": True, "keys": {"configured": 1, "healthy": 1},
        "upstream_reachable": None}


async def test_healthz_says_reachable_after_an_answer(client: TestClient) -> None:
    assert await answered(client.post("/chat", json={"content": "Hi"})) == 200
    body = await healthz(client)
    assert (body["upstream_reachable"], body["keys"]) == (True, {"configured": 1, "healthy": 1})


async def test_healthz_says_unreachable_after_the_upstream_cannot_be_reached(make_client: MakeClient) -> None:
    client = await make_client(upstream={"base_url": f"http://127.0.0.1:{refusing_port()}/v1"})
    response = await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)
    assert response.status == 502
    assert (await response.json())["error"]["message"] == "Could not reach the upstream at 127.0.0.1."
    body = await healthz(client)
    assert (body["upstream_reachable"], body["keys"]) == (False, {"configured": 1, "healthy": 1})


async def test_healthz_counts_a_key_the_upstream_refused_as_unhealthy(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    assert (await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)).status == 503
    body = await healthz(client)
    assert body["keys"] == {"configured": 1, "healthy": 0}


async def test_healthz_reports_the_offline_provider_without_keys(make_client: MakeClient) -> None:
    client = await make_client(upstream={"api_keys": []})
    body = await healthz(client)
    assert (body["provider"], body["keys"], body["upstream_reachable"]) == (
        "offline", {"configured": 0, "healthy": 0}, None)


async def test_an_offline_answer_says_nothing_about_the_upstream(make_client: MakeClient) -> None:
    client = await make_client(upstream={"api_keys": []})
    response = await client.post("/chat", json={"content": "Hi"})
    assert await response.text() == texts.OFFLINE_ANSWER + "\n"
    assert (await healthz(client))["upstream_reachable"] is None  # the built-in provider never touched it


async def test_healthz_uptime_grows(client: TestClient) -> None:
    first = (await healthz(client))["uptime_s"]
    await asyncio.sleep(0.2)
    assert (await healthz(client))["uptime_s"] > first


# --- logging ------------------------------------------------------------------------------------------------------

async def test_one_info_line_per_question_with_entry_outcome_deltas_and_ms(
        client: TestClient, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    fake.script.append(Stream(delay=0.02))  # four pieces, each in its own network read
    answered = await client.post("/chat", json={"content": "Hi"})
    assert answered.status == 200 and await answered.text() == "Hello, **world**!\n"
    fake.script.append(Fail(500))
    assert (await client.post("/v1/chat/completions", json=v1_body(), headers=TRUSTED)).status == 502
    records = question_lines(caplog)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    parsed = [QUESTION_LINE.match(r.getMessage()) for r in records]
    assert all(parsed), [r.getMessage() for r in records]
    # The usage is the upstream's (the fake's last chunk); a failed question has none.
    assert [(m[1], m[2], m[4], m[5], m[9], m[10], m[11]) for m in parsed if m] == [
        ("chat", "chat", "ok", "4", "9", "12", None), ("v1", "chat", "upstream_error", "0", "-", "-", None)]
    assert parsed[0] and parsed[0][7] != "-" and int(parsed[0][6]) >= 1
    assert parsed[1] and parsed[1][7] == "-"  # no text: no time to first token
    assert parsed[1][6] == "0"  # refused before any event was read


async def test_the_identity_in_the_question_line_is_hashed(client: TestClient,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert await answered(client.post("/chat", json={"content": "Hi"})) == 200
    # 127.0.0.1 is a trusted proxy by default, so its X-Real-IP is the client.
    assert await answered(client.post("/chat", json={"content": "Hi"}, headers={"X-Real-IP": "203.0.113.9"})) == 200
    lines = [r.getMessage() for r in question_lines(caplog)]
    assert len(lines) == 2
    for line in lines:
        assert "127.0.0.1" not in line and "203.0.113.9" not in line
    who = [m[3] for m in (QUESTION_LINE.match(line) for line in lines) if m]
    assert who == [hashed("127.0.0.1"), hashed("203.0.113.9")]


async def test_prompt_text_is_never_logged_by_default(client: TestClient, fake: FakeOpenAI,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    prompt = "my very private prompt 4711"
    assert await answered(client.post("/chat", json={"content": prompt})) == 200
    assert (await client.post("/v1/chat/completions", json=v1_body(prompt), headers=TRUSTED)).status == 200
    fake.script.append(Fail(500))
    async with ws_connect(client) as ws:
        await ws.send_json(question(prompt))
        await receive_answer(ws)
    assert len(question_lines(caplog)) == 3
    assert all(prompt not in r.getMessage() for r in caplog.records)
    assert prompt not in caplog.text


async def test_prompt_text_is_logged_when_logging_prompts_is_on(make_client: MakeClient,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(logging={"prompts": True})
    caplog.set_level(logging.INFO)
    assert await answered(client.post("/chat", json={"content": "tell me a joke"})) == 200
    [record] = question_lines(caplog)
    match = QUESTION_LINE.match(record.getMessage())
    assert match and match[11] == " prompt='tell me a joke'"


async def test_no_key_or_token_is_logged_across_a_run_with_failures(
        make_client: MakeClient, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client(admin={"token": ADMIN_TOKEN}, limits={"http_per_second": 100})
    fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    user = {"Authorization": f"Bearer {USER_KEY}"}
    assert (await client.post("/v1/chat/completions", json=v1_body(), headers=user)).status == 401
    fake.script.append(Fail(500))
    async with ws_connect(client) as ws:
        await ws.send_json(question(authValue=f"Bearer {USER_KEY}", isDemo=False))
        assert (await receive_answer(ws))[-1]["isSuccess"] is False
    fake.valid_keys = set()
    verify = await client.post("/api/auth/apikey/verify", json={"apiKey": USER_KEY})
    assert (await verify.json())["status"] == "400001"
    fake.script.extend([Fail(500), Fail(401, "Incorrect API key provided.", code="invalid_api_key")])
    assert (await client.post("/chat", json={"content": "Hi"}, headers=TRUSTED)).status == 502
    assert (await client.post("/chat", json={"content": "Hi"}, headers=TRUSTED)).status == 503
    assert (await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).status == 200
    assert (await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"})).status == 401
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("…0001" in line for line in warnings), warnings  # the server key was logged, masked
    for secret in (SERVER_KEY, USER_KEY, ADMIN_TOKEN, CLIENT_TOKEN):
        assert all(secret not in r.getMessage() for r in caplog.records), secret
        assert secret not in caplog.text


async def test_log_format_json_prints_one_json_object_per_line(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(json.dumps({
        "server": {"host": "127.0.0.1"},
        "images": {"folder": str(tmp_path / "images")},
        "state": {"file": str(tmp_path / "state.json")},
    }), encoding="utf-8")
    log_path = tmp_path / "server.log"
    body, returncode, port = await serve_until_status(["--config", str(config), "--log-format", "json"], log_path)
    assert (body["status"], body["state"], returncode) == ("000000", True, 0)
    lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries
    for entry in entries:
        assert set(entry) == {"time", "level", "logger", "message"}, entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", entry["time"])
        assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
    starting = [e for e in entries if e["message"].startswith(f"chatgpt-api starting on http://127.0.0.1:{port}")]
    assert [(e["level"], e["logger"]) for e in starting] == [("INFO", "chatgpt")]
    assert "provider: offline" in starting[0]["message"]
    assert any(e["logger"] == "aiohttp.access" and "/status" in e["message"] for e in entries)
