"""Who may reach the operator's doors (PROTOCOL.md E.3): `/metrics` only for allowed direct peers,
`/admin` with a limit on wrong tokens and a 401 for any odd `Authorization`."""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain.failures import FailureLimit
from chatgpt.server.local_store import MAX_FAILURE_ENTRIES, LocalStore
from chatgpt.settings import SettingsError
from tests.conftest import MakeClient, build_settings, url

ADMIN_TOKEN = "adm-ops-access-token-1357"
RIGHT = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WRONG = {"Authorization": "Bearer adm-ops-access-wrong-000"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def raw_request(client: TestClient, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as written (no client would send raw non-UTF-8 header bytes); status and body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback."""
    return [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR or r.exc_info]


# --- /metrics -----------------------------------------------------------------------------------------------------

async def test_metrics_answers_a_direct_loopback_peer(client: TestClient) -> None:
    for path in ("/metrics", "//metrics"):
        response = await client.session.get(url(client, path))
        assert response.status == 200
        assert "chatgpt_websocket_connections" in await response.text()


@pytest.mark.parametrize("header", [{"X-Forwarded-For": "203.0.113.7"}, {"X-Real-IP": "203.0.113.7"},
                                    {"Forwarded": "for=203.0.113.7"}, {"X-Forwarded-For": "127.0.0.1"},
                                    {"x-real-ip": ""}])
async def test_metrics_refuses_any_request_that_came_through_a_proxy(client: TestClient,
                                                                     header: dict[str, str]) -> None:
    # The peer is loopback and allowed; the header says a proxy (nginx) passed the request on.
    response = await client.get("/metrics", headers=header)
    assert response.status == 403
    assert "chatgpt_" not in await response.text()


async def test_metrics_refuses_a_peer_outside_metrics_allow(make_client: MakeClient) -> None:
    client = await make_client(ops={"metrics_allow": ["10.0.0.0/8", "2001:db8::/32"]})
    response = await client.get("/metrics")
    assert response.status == 403
    assert (await client.get("/healthz")).status == 200  # the uptime check stays open


async def test_metrics_allows_a_configured_network(make_client: MakeClient) -> None:
    client = await make_client(ops={"metrics_allow": ["127.0.0.0/8"]})
    assert (await client.get("/metrics")).status == 200


@pytest.mark.parametrize("entries", [["localhost"], ["10.0.0.0/33"], ["not an address"]])
def test_a_bad_metrics_allow_entry_stops_the_start_naming_the_setting(tmp_path: Path, entries: list[str]) -> None:
    with pytest.raises(SettingsError, match="ops.metrics_allow"):
        build_settings(tmp_path, None, {"ops": {"metrics_allow": entries}})


# --- /admin -------------------------------------------------------------------------------------------------------

async def test_after_10_wrong_tokens_an_address_gets_429_with_retry_after_even_with_the_right_token(
        make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    attacker = {"X-Real-IP": "203.0.113.66"}  # through the trusted loopback proxy
    for _ in range(10):
        assert (await client.get("/admin/runtime", headers={**attacker, **WRONG})).status == 401
    for headers in (WRONG, RIGHT, {}):
        refused = await client.get("/admin/runtime", headers={**attacker, **headers})
        assert refused.status == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert set((await refused.json())["error"]) == {"message", "type", "param", "code"}
    # Another address (the operator's) is not locked out by the attacker.
    assert (await client.get("/admin/runtime", headers={"X-Real-IP": "198.51.100.1", **RIGHT})).status == 200


async def test_right_tokens_do_not_count_towards_the_limit(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    for _ in range(9):
        assert (await client.get("/admin/runtime", headers=WRONG)).status == 401
    for _ in range(20):
        assert (await client.get("/admin/runtime", headers=RIGHT)).status == 200


async def test_the_failure_limit_lets_an_address_try_again_when_its_oldest_failure_is_a_minute_old() -> None:
    clock = FakeClock()
    limit = FailureLimit(LocalStore(), "admin", 10, 60.0, clock=clock)
    for _ in range(9):
        await limit.record("203.0.113.66")
        clock.now += 1
    assert await limit.retry_after("203.0.113.66") == 0
    await limit.record("203.0.113.66")  # the 10th, 9 s after the first
    assert await limit.retry_after("203.0.113.66") == pytest.approx(51.0)
    assert await limit.retry_after("198.51.100.1") == 0
    clock.now += 50.9
    assert await limit.retry_after("203.0.113.66") > 0
    clock.now += 0.2  # the first failure is now over a minute old: 9 in the window
    assert await limit.retry_after("203.0.113.66") == 0


async def test_the_failure_limit_keeps_a_bounded_number_of_addresses() -> None:
    store = LocalStore()
    limit = FailureLimit(store, "admin", 2, 60.0, clock=FakeClock())
    for n in range(MAX_FAILURE_ENTRIES + 500):
        await limit.record(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(store.failure_log) == MAX_FAILURE_ENTRIES


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"\xc3\x28 token", b"Bearer adm-\x80-x",
                                   b"tokenwithoutscheme", b"Bearer", b"Bearer ", b"Basic YWRtaW46YWRtaW4=",
                                   b"bearer  " + ADMIN_TOKEN.encode() + b"x", b"\xe2\x82\xac"])
async def test_a_malformed_authorization_is_a_401_never_a_500(make_client: MakeClient, value: bytes,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    status, body = await raw_request(client, b"GET /admin/runtime HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             b"Authorization: " + value + b"\r\nConnection: close\r\n\r\n")
    assert status == 401
    assert json.loads(body)["error"]["type"] == "admin_error"
    assert errors(caplog) == []


async def test_the_right_token_with_odd_spacing_and_scheme_case_is_accepted(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    status, _ = await raw_request(client, b"GET /admin/runtime HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bEaReR  "
                                          + ADMIN_TOKEN.encode() + b" \r\nConnection: close\r\n\r\n")
    assert status == 200
