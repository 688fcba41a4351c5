"""The mini-program's HTTP routes (PROTOCOL.md A.1, A.2) against the real app, at `/x` and `//x`."""
from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.faces.markdown import to_html
from tests.conftest import USER_KEY, MakeClient, url
from tests.fakes.openai import FakeOpenAI
from tests.helpers.frames import wait_until
from tests.helpers.servers import refusing_port

SLASHES = ["/", "//"]  # the mini-program builds `base + "/path"` with `base` ending in `/`
API_PREFIXES = ["/api/", "//api/", "/api1/", "//api1/"]  # /api1/ is the Java backend's alias of /api/
CLOSED_UPSTREAM = f"http://127.0.0.1:{refusing_port()}/v1"  # nothing listens there: the connect is refused
ENVELOPE_KEYS = {"status", "msg", "timestamp"}
VERIFY = "auth/apikey/verify"


async def send(client: TestClient, method: str, path: str, **kwargs: Any) -> ClientResponse:
    """One request with the path sent exactly as given (TestClient itself refuses `//x`), never following redirects."""
    response = await client.session.request(method, url(client, path), allow_redirects=False, **kwargs)
    await response.read()
    return response


async def envelope(client: TestClient, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """The envelope answered at `path`, after checking it is HTTP 200 JSON with a fresh ms timestamp."""
    before = int(time.time() * 1000)
    response = await send(client, method, path, **kwargs)
    after = int(time.time() * 1000)
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body, dict)
    assert isinstance(body["status"], str) and re.fullmatch(r"\d{6}", body["status"])
    assert isinstance(body["msg"], str)
    assert type(body["timestamp"]) is int and before <= body["timestamp"] <= after
    return body


def fields(body: dict[str, Any]) -> dict[str, Any]:
    """The envelope without its timestamp, for exact comparisons."""
    return {k: v for k, v in body.items() if k != "timestamp"}


SUCCESS = {"status": "000000", "msg": texts.SUCCESS}


@pytest.mark.parametrize("path", SLASHES)
async def test_root_answers_a_bare_success_envelope(client: TestClient, path: str) -> None:
    body = await envelope(client, "GET", path)
    assert set(body) == ENVELOPE_KEYS
    assert fields(body) == SUCCESS


@pytest.mark.parametrize("slash", SLASHES)
async def test_status_says_serving_by_default(client: TestClient, slash: str) -> None:
    body = await envelope(client, "GET", f"{slash}status")
    assert fields(body) == {**SUCCESS, "state": True}


@pytest.mark.parametrize("path", ["/status", "//status", "///status?a=1"])
async def test_access_log_shows_the_path_the_client_sent(client: TestClient, caplog: pytest.LogCaptureFixture,
                                                         path: str) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    await send(client, "GET", path)
    await wait_until(lambda: any(r.name == "aiohttp.access" for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert f'"GET {path} HTTP/1.1" 200 ' in lines[0]


@pytest.mark.parametrize("slash", SLASHES)
async def test_status_says_not_serving_during_maintenance(make_client: MakeClient, slash: str) -> None:
    client = await make_client(runtime={"status": "FALSE"})
    body = await envelope(client, "GET", f"{slash}status")
    assert fields(body) == {**SUCCESS, "state": False}


@pytest.mark.parametrize("slash", SLASHES)
async def test_announcement_is_left_out_when_unset(client: TestClient, slash: str) -> None:
    body = await envelope(client, "GET", f"{slash}announcement")
    assert set(body) == ENVELOPE_KEYS
    assert fields(body) == SUCCESS


@pytest.mark.parametrize("slash", SLASHES)
async def test_announcement_carries_the_runtime_text(make_client: MakeClient, slash: str) -> None:
    client = await make_client(runtime={"announcement": "今晚 22:00 维护 | maintenance tonight"})
    body = await envelope(client, "GET", f"{slash}announcement")
    assert fields(body) == {**SUCCESS, "content": "今晚 22:00 维护 | maintenance tonight"}


@pytest.mark.parametrize("slash", SLASHES)
async def test_demo_chat_list_has_one_finished_assistant_bubble_per_segment(make_client: MakeClient,
                                                                             slash: str) -> None:
    client = await make_client(runtime={"demoChat": "a|b|c"})
    before = datetime.now().replace(microsecond=0)
    body = await envelope(client, "GET", f"{slash}demoChatList")
    after = datetime.now()
    assert set(body) == ENVELOPE_KEYS | {"messageList"}
    assert fields(body)["status"] == "000000" and body["msg"] == texts.SUCCESS
    items = body["messageList"]
    assert [item["content"] for item in items] == ["a", "b", "c"]
    for item in items:
        assert set(item) == {"id", "role", "parent", "content", "html", "isSend", "isDone", "createTime"}
        assert str(uuid.UUID(item["id"])) == item["id"]
        assert (item["role"], item["parent"], item["isSend"], item["isDone"]) == ("assistant", "1", False, True)
        assert item["html"] == to_html(item["content"])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", item["createTime"])
        assert before <= datetime.strptime(item["createTime"], "%Y-%m-%d %H:%M:%S") <= after
    assert len({item["id"] for item in items}) == 3


@pytest.mark.parametrize("slash", SLASHES)
async def test_demo_chat_list_is_left_out_when_unset(client: TestClient, slash: str) -> None:
    body = await envelope(client, "GET", f"{slash}demoChatList")
    assert set(body) == ENVELOPE_KEYS
    assert fields(body) == SUCCESS


@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_accepts_a_key_the_upstream_accepts(client: TestClient, fake: FakeOpenAI,
                                                         prefix: str) -> None:
    fake.valid_keys = {USER_KEY}
    body = await envelope(client, "POST", prefix + VERIFY, json={"apiKey": USER_KEY})
    assert set(body) == ENVELOPE_KEYS
    assert fields(body) == SUCCESS
    assert [(r.method, r.path, r.authorization) for r in fake.requests] == [
        ("GET", "/v1/models", f"Bearer {USER_KEY}")]


@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_refuses_a_wrong_key(client: TestClient, fake: FakeOpenAI, prefix: str) -> None:
    fake.valid_keys = {USER_KEY}
    body = await envelope(client, "POST", prefix + VERIFY, json={"apiKey": "sk-wrong-key-0000"})
    assert fields(body) == {"status": "400001", "msg": "API Key不正确!"}


@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_says_the_account_is_banned_for_a_deactivated_key(client: TestClient, fake: FakeOpenAI,
                                                                       prefix: str) -> None:
    fake.deactivated_keys = {USER_KEY}
    body = await envelope(client, "POST", prefix + VERIFY, json={"apiKey": USER_KEY})
    assert fields(body) == {"status": "400001", "msg": "账号已被封禁!"}


@pytest.mark.parametrize("payload", [{}, {"apiKey": ""}, {"apiKey": "   "}, {"apiKey": None},
                                     {"apikey": USER_KEY}])
@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_refuses_a_blank_or_missing_key_without_asking_upstream(
        client: TestClient, fake: FakeOpenAI, prefix: str, payload: dict[str, Any]) -> None:
    body = await envelope(client, "POST", prefix + VERIFY, json=payload)
    assert fields(body) == {"status": "300001", "msg": "apiKey不能为空!"}
    assert fake.requests == []


@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_reports_a_service_error_when_the_upstream_is_unreachable(make_client: MakeClient,
                                                                               prefix: str) -> None:
    client = await make_client(upstream={"base_url": CLOSED_UPSTREAM})
    body = await envelope(client, "POST", prefix + VERIFY, json={"apiKey": USER_KEY})
    assert fields(body) == {"status": "500001", "msg": texts.SERVICE_ERROR}


@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_with_an_empty_body_is_a_json_empty_error(client: TestClient, prefix: str) -> None:
    body = await envelope(client, "POST", prefix + VERIFY, data=b"",
                          headers={"Content-Type": "application/json"})
    assert fields(body) == {"status": "200001", "msg": texts.BODY_EMPTY}


@pytest.mark.parametrize("raw", [b"not json", b'{"apiKey": "sk-', b"[1, 2]", b'["sk-abc"]', b'"sk-abc"', b"null"])
@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_verify_with_a_body_that_is_not_a_json_object_is_a_json_error(client: TestClient, fake: FakeOpenAI,
                                                                            prefix: str, raw: bytes) -> None:
    body = await envelope(client, "POST", prefix + VERIFY, data=raw,
                          headers={"Content-Type": "application/json"})
    assert fields(body) == {"status": "200002", "msg": texts.BODY_NOT_JSON}
    assert fake.requests == []


@pytest.mark.parametrize(("route", "payload"), [("auth", {"email": "a@b.c", "password": "secret"}),
                                                ("auth/token/verify", {"accessToken": "eyJhbGciOi"})])
@pytest.mark.parametrize("prefix", API_PREFIXES)
async def test_obsolete_login_routes_answer_a_clear_error_envelope(client: TestClient, prefix: str, route: str,
                                                                   payload: dict[str, Any]) -> None:
    body = await envelope(client, "POST", prefix + route, json=payload)
    assert set(body) == ENVELOPE_KEYS
    assert fields(body) == {"status": "400001", "msg": texts.LOGIN_GONE}
    assert "API Key" in body["msg"]


BACKEND_API = [("GET", "backend-api/conversations"), ("POST", "backend-api/gentitle"),
               ("GET", "backend-api/conversation"), ("POST", "backend-api/moderation")]


@pytest.mark.parametrize(("method", "route"), BACKEND_API)
@pytest.mark.parametrize("slash", SLASHES)
async def test_backend_api_without_authorization_says_it_is_null(client: TestClient, slash: str, method: str,
                                                                 route: str) -> None:
    body = await envelope(client, method, slash + route, json={"conversation_id": "c-1"})
    assert fields(body) == {"status": "900001", "msg": "Authorization is null!"}


@pytest.mark.parametrize(("method", "route"), BACKEND_API)
@pytest.mark.parametrize("slash", SLASHES)
async def test_backend_api_with_authorization_says_token_mode_is_unsupported(
        client: TestClient, fake: FakeOpenAI, slash: str, method: str, route: str) -> None:
    body = await envelope(client, method, slash + route, json={"conversation_id": "c-1"},
                          headers={"Authorization": "Bearer eyJhbGciOi.access.token"})
    assert fields(body) == {"status": "500001", "msg": texts.TOKEN_UNSUPPORTED}
    assert fake.requests == []


@pytest.mark.parametrize("slash", SLASHES)
async def test_debug_flag_is_plain_text_false_by_default(client: TestClient, slash: str) -> None:
    response = await send(client, "GET", f"{slash}cache/YhI86Yjjoko")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "FALSE"


@pytest.mark.parametrize("slash", SLASHES)
async def test_debug_flag_is_plain_text_true_when_set(make_client: MakeClient, slash: str) -> None:
    client = await make_client(runtime={"isDebug": "TRUE"})
    response = await send(client, "GET", f"{slash}cache/YhI86Yjjoko")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert await response.text() == "TRUE"


ALL_ROUTES = [("GET", ""), ("GET", "status"), ("GET", "announcement"), ("GET", "demoChatList"),
              ("POST", "api/auth/apikey/verify"), ("POST", "api1/auth/apikey/verify"), ("POST", "api/auth"),
              ("POST", "api1/auth"), ("POST", "api/auth/token/verify"), ("POST", "api1/auth/token/verify"),
              *BACKEND_API, ("GET", "cache/YhI86Yjjoko")]


async def test_no_route_answers_with_a_redirect(make_client: MakeClient) -> None:
    client = await make_client(limits={"http_per_second": 10000})
    seen = []
    for method, route in ALL_ROUTES:
        for slash in ("/", "//", "///"):
            response = await send(client, method, slash + route, json={"apiKey": USER_KEY})
            seen.append((method, slash + route, response.status))
    assert [s for s in seen if not 200 <= s[2] < 300] == []


@pytest.mark.parametrize("path", ["/nope", "//nope", "/api/nope", "//api1/nope", "/status/extra", "//backend-api/x"])
async def test_an_unknown_path_is_not_found(client: TestClient, path: str) -> None:
    response = await send(client, "GET", path)
    assert response.status == 404


async def test_the_key_given_to_verify_never_reaches_the_logs(make_client: MakeClient, fake: FakeOpenAI,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_client()
    unreachable = await make_client(upstream={"base_url": CLOSED_UPSTREAM})
    good, wrong, banned, broken = ("sk-good-SECRETKEY-1111", "sk-wrong-SECRETKEY-2222", "sk-banned-SECRETKEY-3333",
                                   "sk-broken-SECRETKEY-4444\r\nX-Evil: 1")
    fake.valid_keys = {good, banned}
    fake.deactivated_keys = {banned}
    statuses = []
    for target, key in ((client, good), (client, wrong), (client, banned), (client, broken),
                        (unreachable, "sk-unreachable-SECRETKEY-5555")):
        body = await envelope(target, "POST", "//api/auth/apikey/verify", json={"apiKey": key})
        statuses.append(body["status"])
    assert statuses == ["000000", "400001", "400001", "500001", "500001"]
    assert caplog.records  # the access log was captured, so an absent key means it was never logged
    assert "SECRETKEY" not in caplog.text
