"""The admin API and the state file through the real app: auth, runtime flags, keys, quota, restarts."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from chatgpt.domain import texts
from chatgpt.domain.keypool import fingerprint
from chatgpt.faces.markdown import to_html
from chatgpt.settings import Settings
from tests.conftest import MakeClient, build_settings, url, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer

ADMIN_TOKEN = "adm-secret-123-state"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY_A = "sk-key-aaaa1111"
KEY_B = "sk-key-bbbb2222"
DEFAULT_FLAGS = {"status": "TRUE", "isDebug": "FALSE", "announcement": "", "demoChat": "", "demoLimit": 20}
ROUTES = [("GET", "/admin/runtime"), ("PATCH", "/admin/runtime"), ("GET", "/admin/keys"),
          ("POST", "/admin/quota/reset"), ("POST", "/admin/words/reload")]


async def ask(client: TestClient, prompt: str = "你好", who: str | None = None) -> list[dict[str, Any]]:
    """One anonymous question on a fresh socket (from `who` when given); its frames up to isDone."""
    headers = {"X-Real-IP": who} if who else {}
    async with ws_connect(client, headers=headers) as ws:
        await ws.send_json(question(prompt))
        return await receive_answer(ws)


async def remaining(client: TestClient, who: str | None = None) -> str:
    """The answer to `查询次数` for `who`."""
    frames = await ask(client, texts.QUOTA_QUERY, who)
    assert len(frames) == 1 and frames[0]["isDone"] is True and frames[0]["isSuccess"] is False
    return frames[0]["content"]


def answered(frames: list[dict[str, Any]]) -> bool:
    """True when a question got text and then the one DONE frame."""
    return len(frames) >= 2 and frames[-1]["content"] == "DONE" and frames[-1]["isSuccess"] is True


async def runtime_flags(client: TestClient) -> dict[str, Any]:
    """`GET /admin/runtime` with the right token."""
    response = await client.get("/admin/runtime", headers=ADMIN)
    assert response.status == 200
    return await response.json()


async def admin_error(response: Any, status: int) -> None:
    """An admin failure: the real status and a JSON error object with a message."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]


async def started(settings: Settings) -> TestClient:
    """The real app on a real socket, started explicitly (closing it runs the shutdown save)."""
    client = TestClient(TestServer(create_app(settings)))
    try:
        await client.start_server()
    except BaseException:
        await client.close()  # a failed start must not leak the client's session
        raise
    return client


# --- admin auth ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"},
                                     {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": ADMIN_TOKEN},
                                     {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, {"Authorization": "Bearer "}])
async def test_admin_api_refuses_a_missing_or_wrong_token_with_401(make_client: MakeClient,
                                                                   headers: dict[str, str]) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    for method, path in ROUTES:
        response = await client.request(method, path, headers=headers, json={"status": "FALSE"})
        await admin_error(response, 401)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert await runtime_flags(client) == DEFAULT_FLAGS


async def test_admin_api_with_the_right_token_returns_the_runtime_flags(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN}, runtime={"announcement": "notice"},
                               quota={"daily_questions": 7})
    response = await client.session.get(url(client, "//admin/runtime"), headers=ADMIN)
    assert response.status == 200
    assert await response.json() == {**DEFAULT_FLAGS, "announcement": "notice", "demoLimit": 7}


async def test_admin_api_is_off_without_a_configured_token(make_client: MakeClient) -> None:
    client = await make_client()
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer "}, ADMIN):
            await admin_error(await client.request(method, path, headers=headers, json={}), 404)


# --- runtime flags ------------------------------------------------------------------------------------------------

async def test_patching_status_false_starts_maintenance_at_once_and_true_ends_it(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    response = await client.patch("/admin/runtime", json={"status": "FALSE"}, headers=ADMIN)
    assert response.status == 200
    assert await response.json() == {**DEFAULT_FLAGS, "status": "FALSE"}
    status = await (await client.session.get(url(client, "//status"))).json()
    assert (status["status"], status["state"]) == ("000000", False)
    frames = await ask(client)
    assert frames == [{"conversationId": "c-1", "role": "assistant", "content": texts.MAINTENANCE,
                       "html": to_html(texts.MAINTENANCE), "createTime": frames[0]["createTime"],
                       "isDone": True, "isSuccess": False}]
    assert fake.requests == []
    assert (await client.patch("/admin/runtime", json={"status": "TRUE"}, headers=ADMIN)).status == 200
    assert (await (await client.session.get(url(client, "//status"))).json())["state"] is True
    assert answered(await ask(client))


async def test_patching_the_announcement_shows_it_on_the_announcement_route(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    before = await (await client.session.get(url(client, "//announcement"))).json()
    assert "content" not in before
    assert (await client.patch("/admin/runtime", json={"announcement": "hi"}, headers=ADMIN)).status == 200
    after = await (await client.session.get(url(client, "//announcement"))).json()
    assert (after["status"], after["content"]) == ("000000", "hi")


async def test_patching_demo_limit_changes_the_daily_quota_at_once(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN}, quota={"daily_questions": 5})
    assert await remaining(client) == "5"
    assert (await client.patch("/admin/runtime", json={"demoLimit": 1}, headers=ADMIN)).status == 200
    assert await remaining(client) == "1"
    assert answered(await ask(client))
    assert [f["content"] for f in await ask(client)] == [texts.QUOTA_USED_UP]


@pytest.mark.parametrize("body", [b'{"status": 5}', b'{"nope": 1}', b'{"status": "FALSE", "nope": 1}',
                                  b'{"status": "maybe"}', b'{"demoLimit": -1}', b'{"demoLimit": true}',
                                  b'{"demoLimit": "3"}', b'[{"status": "FALSE"}]', b'"FALSE"', b"not json",
                                  b"{}", b""])
async def test_an_invalid_patch_is_400_and_changes_nothing(make_client: MakeClient, tmp_path: Path,
                                                          body: bytes) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    response = await client.patch("/admin/runtime", data=body,
                                  headers={**ADMIN, "Content-Type": "application/json"})
    await admin_error(response, 400)
    assert await runtime_flags(client) == DEFAULT_FLAGS
    assert (await (await client.session.get(url(client, "//status"))).json())["state"] is True
    assert not (tmp_path / "state.json").exists()  # nothing changed, so nothing was saved


# --- keys and quota ------------------------------------------------------------------------------------------------

async def test_admin_keys_lists_each_key_masked_with_its_health_and_never_the_full_key(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN}, upstream={"api_keys": [KEY_A, KEY_B]})
    fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    assert answered(await ask(client))
    response = await client.get("/admin/keys", headers=ADMIN)
    assert response.status == 200
    text = await response.text()
    assert json.loads(text) == {"usable": 1, "keys": [
        {"key": "…1111", "state": "disabled", "until": None, "reason": "invalid_api_key",
         "requests": 1, "failures": 1, "upstream": "default", "tokens_today": {}},
        # The answer's usage (the fake's last chunk), counted on the key that paid for it, per model.
        {"key": "…2222", "state": "healthy", "until": None, "reason": None, "requests": 1, "failures": 0,
         "upstream": "default", "tokens_today": {"gpt-3.5-turbo": {"prompt": 9, "completion": 12}}},
    ]}
    for secret in (KEY_A, KEY_B, "sk-key", "aaaa", "bbbb"):
        assert secret not in text


async def test_quota_reset_restores_one_identity_or_everyone(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN}, quota={"daily_questions": 1})
    for who in ("10.0.0.1", "10.0.0.2"):
        assert answered(await ask(client, who=who))
        assert await remaining(client, who) == "0"
    one = await client.post("/admin/quota/reset", json={"identity": "10.0.0.1"}, headers=ADMIN)
    assert one.status == 200
    assert await one.json() == {"reset": 1, "identity": "10.0.0.1"}
    assert (await remaining(client, "10.0.0.1"), await remaining(client, "10.0.0.2")) == ("1", "0")
    everyone = await client.post("/admin/quota/reset", json={}, headers=ADMIN)
    assert await everyone.json() == {"reset": 1, "identity": None}
    assert (await remaining(client, "10.0.0.1"), await remaining(client, "10.0.0.2")) == ("1", "1")
    assert answered(await ask(client, who="10.0.0.2"))


async def test_quota_reset_refuses_an_identity_that_is_not_a_string(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    await admin_error(await client.post("/admin/quota/reset", json={"identity": 5}, headers=ADMIN), 400)


# --- the state file ------------------------------------------------------------------------------------------------

def no_temp_files(folder: Path) -> None:
    """The atomic write left nothing behind but the state file itself."""
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".state")]
    assert leftovers == []


async def test_flags_quota_and_a_disabled_key_survive_a_restart(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = build_settings(tmp_path, fake, {"admin": {"token": ADMIN_TOKEN},
                                               "upstream": {"api_keys": [KEY_A, KEY_B]}})
    state_file = tmp_path / "state.json"

    first = await started(settings)
    try:
        changed = await first.patch("/admin/runtime", json={"announcement": "persisted", "demoLimit": 5},
                                    headers=ADMIN)
        assert changed.status == 200
        saved = json.loads(state_file.read_text(encoding="utf-8"))  # written on change
        assert (saved["flags"]["announcement"], saved["flags"]["demoLimit"]) == ("persisted", 5)
        fake.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
        fake.default = Stream(usage={"prompt_tokens": 7, "completion_tokens": 3})
        assert answered(await ask(first, who="10.0.0.1"))  # KEY_A refused, KEY_B answered
        assert answered(await ask(first, who="10.0.0.1"))
    finally:
        await first.close()

    text = state_file.read_text(encoding="utf-8")
    saved = json.loads(text)  # written again at shutdown, with what changed since the PATCH
    assert saved["quota"]["used"] == {"10.0.0.1": 2}
    assert saved["keys"]["keys"][fingerprint(KEY_A)]["disabled"] is True
    assert KEY_A not in text and KEY_B not in text
    no_temp_files(tmp_path)

    second = await started(settings)
    try:
        assert await runtime_flags(second) == {**DEFAULT_FLAGS, "announcement": "persisted", "demoLimit": 5}
        assert (await (await second.session.get(url(second, "//announcement"))).json())["content"] == "persisted"
        assert await remaining(second, "10.0.0.1") == "3"
        keys = await (await second.get("/admin/keys", headers=ADMIN)).json()
        assert [(k["key"], k["state"], k["reason"]) for k in keys["keys"]] == [
            ("…1111", "disabled", "invalid_api_key"), ("…2222", "healthy", None)]
        assert [k["tokens_today"] for k in keys["keys"]] == [{}, {"gpt-3.5-turbo": {"prompt": 14, "completion": 6}}]
        before = len(fake.chat_requests())
        assert answered(await ask(second, who="10.0.0.2"))
        assert [r.authorization for r in fake.chat_requests()[before:]] == [f"Bearer {KEY_B}"]
    finally:
        await second.close()
    json.loads(state_file.read_text(encoding="utf-8"))
    no_temp_files(tmp_path)


GARBAGE = [b"{not json at all", b"[1, 2, 3]", b'{"version": 99}', b"\xff\xfe\x00 binary garbage \x9c"]


@pytest.mark.parametrize("garbage", GARBAGE, ids=["broken-json", "not-an-object", "wrong-version", "not-utf8"])
async def test_a_corrupt_state_file_is_kept_aside_and_the_app_starts_fresh(
        tmp_path: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, garbage: bytes) -> None:
    caplog.set_level(logging.INFO)
    state_file = tmp_path / "state.json"
    state_file.write_bytes(garbage)
    client = await started(build_settings(tmp_path, fake, {"admin": {"token": ADMIN_TOKEN}}))
    try:
        status = await (await client.session.get(url(client, "//status"))).json()
        assert (status["status"], status["state"]) == ("000000", True)
        assert await runtime_flags(client) == DEFAULT_FLAGS
        assert answered(await ask(client))
    finally:
        await client.close()
    aside = sorted(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == garbage
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "corrupt" in warnings[0].getMessage() and aside[0].name in warnings[0].getMessage()
    assert json.loads(state_file.read_text(encoding="utf-8"))["flags"] == DEFAULT_FLAGS  # fresh, saved at shutdown


async def test_a_second_corrupt_state_file_does_not_overwrite_the_first_one_kept_aside(
        tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = build_settings(tmp_path, fake)
    state_file = tmp_path / "state.json"
    for garbage in (b"first garbage", b"second garbage"):
        state_file.write_bytes(garbage)
        client = await started(settings)
        await client.close()
    kept = sorted(p.read_bytes() for p in tmp_path.glob("state.json.corrupt-*"))
    assert kept == [b"first garbage", b"second garbage"]
