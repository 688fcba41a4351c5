"""Several upstreams (PROTOCOL.md E.4) against the real app and two fake upstreams on loopback: routing by
model, aliases, fall-over before the first answer event, pictures on their own upstream, the shorthand."""
from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from chatgpt.domain import texts
from chatgpt.settings import load_settings
from tests.conftest import CLIENT_TOKEN, USER_KEY, ws_connect
from tests.fakes.openai import Fail, FaultyOpenAI, RawStream, Recorded, Stream, sse_chunk
from tests.helpers.frames import receive_answer
from tests.helpers.servers import refusing_port

CHAT_KEY = "sk-chat-upstream-key-0001"
CHAT_KEY_2 = "sk-chat-upstream-key-0002"
PICTURE_KEY = "sk-picture-upstream-key-0003"
ADMIN_TOKEN = "admin-token-for-upstreams-0123"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
TRUSTED = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
OWN = {"Authorization": f"Bearer {USER_KEY}"}


class FakeUpstream(FaultyOpenAI):
    """A fake OpenAI-compatible provider that also draws pictures (b64), recording every request."""

    def __init__(self) -> None:
        super().__init__()
        self.app.router.add_post("/v1/images/generations", self.generations)
        self.image_failures: list[Fail] = []

    def image_requests(self) -> list[Recorded]:
        """Picture POSTs received so far."""
        return [r for r in self.requests if r.path.endswith("/images/generations")]

    async def generations(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(Recorded(request.method, request.path, request.headers.get("Authorization"), body))
        if self.image_failures:
            return self._fail(self.image_failures.pop(0))
        return web.json_response({"created": 1, "data": [{"b64_json": base64.b64encode(PNG).decode()}]})


Servers = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def chat(aiohttp_server: Servers) -> FakeUpstream:
    """The first upstream (a DeepSeek stand-in)."""
    return await _serve(aiohttp_server)


@pytest.fixture
async def backup(aiohttp_server: Servers) -> FakeUpstream:
    """The second upstream (an OpenAI stand-in that also draws)."""
    return await _serve(aiohttp_server)


async def _serve(aiohttp_server: Servers) -> FakeUpstream:
    fake = FakeUpstream()
    fake.default = Stream(pieces=["from ", "upstream"])
    server = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    return fake


def closed_url() -> str:
    """A loopback base URL nothing listens on: an unreachable upstream."""
    return f"http://127.0.0.1:{refusing_port()}/v1"


def layout(chat: FakeUpstream | str, backup: FakeUpstream | str, **changes: Any) -> dict[str, Any]:
    """The README's layout on the fakes: chat models on the first, the same chat model and pictures on
    the second, an alias for gpt-3.5-turbo. `changes` replace whole sections or the upstream entries."""
    first = {"name": "deepseek", "base_url": getattr(chat, "base_url", chat), "api_keys": [CHAT_KEY],
             "models": ["deepseek-chat", "deepseek-reasoner", "shared"]}
    second = {"name": "pictures", "base_url": getattr(backup, "base_url", backup), "api_keys": [PICTURE_KEY],
              "models": ["gpt-4o-mini", "shared", "gpt-image-1"], "images": True}
    first.update(changes.pop("first", {}))
    second.update(changes.pop("second", {}))
    raw: dict[str, Any] = {
        "upstream": {"connect_timeout": 2, "read_timeout": 5},
        "upstreams": [first, second],
        "models": {"default": "deepseek-chat", "aliases": {"gpt-3.5-turbo": "deepseek-chat"}, "image": "gpt-image-1"},
        "ws": {"frame_interval_ms": 0},
        "api": {"client_tokens": [CLIENT_TOKEN]},
        "admin": {"token": ADMIN_TOKEN},
    }
    raw.update(changes)
    return raw


@pytest.fixture
def start(aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path) -> Callable[..., Awaitable[TestClient]]:
    """Start the real app on settings loaded from a file (the operator's path), with `env`."""
    async def run(raw: dict[str, Any], env: dict[str, str] | None = None) -> TestClient:
        raw = {**raw, "images": {"folder": str(tmp_path / "images")}, "state": {"file": str(tmp_path / "state.json")}}
        path = tmp_path / "settings.yaml"
        path.write_text(json.dumps(raw), encoding="utf-8")
        return await aiohttp_client(create_app(load_settings(path, env=env or {})))
    return run


async def ask(client: TestClient, model: str | None = "deepseek-chat", headers: dict[str, str] | None = None,
              stream: bool = False) -> tuple[int, Any]:
    """One /v1 chat completion; its status and JSON body (or raw SSE text when streamed)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    if model is not None:
        body["model"] = model
    response = await client.post("/v1/chat/completions", json=body, headers=headers or TRUSTED)
    return response.status, (await response.text() if stream else await response.json())


def text_of(body: Any) -> str:
    return str(body["choices"][0]["message"]["content"])


def models_asked(fake: FakeUpstream) -> list[str]:
    return [r.body["model"] for r in fake.chat_requests()]


# --- routing by model and aliases --------------------------------------------------------------------

async def test_each_model_goes_to_the_first_upstream_serving_it(start: Any, chat: FakeUpstream,
                                                                backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    assert (await ask(client, "deepseek-reasoner"))[0] == 200
    assert (await ask(client, "gpt-4o-mini"))[0] == 200
    assert (await ask(client, "shared"))[0] == 200
    assert models_asked(chat) == ["deepseek-reasoner", "shared"]
    assert models_asked(backup) == ["gpt-4o-mini"]
    assert [r.authorization for r in chat.chat_requests()] == [f"Bearer {CHAT_KEY}"] * 2
    assert [r.authorization for r in backup.chat_requests()] == [f"Bearer {PICTURE_KEY}"]


async def test_an_alias_is_asked_upstream_as_its_target_and_no_model_means_the_default(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    status, body = await ask(client, "gpt-3.5-turbo")
    assert (status, text_of(body)) == (200, "from upstream")
    async with ws_connect(client) as ws:  # the mini-program never names a model
        await ws.send_json({"conversationId": "c", "authType": "api", "authValue": "Bearer ", "isDemo": True,
                            "content": "", "messages": [{"role": "user", "content": "Hi"}]})
        frames = await receive_answer(ws)
    assert frames[-2]["content"] == "from upstream"
    assert models_asked(chat) == ["deepseek-chat", "deepseek-chat"]
    assert backup.requests == []


async def test_v1_models_lists_every_model_and_alias_offered(start: Any, chat: FakeUpstream,
                                                             backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["deepseek-chat", "deepseek-reasoner", "shared", "gpt-4o-mini",
                                               "gpt-image-1", "gpt-3.5-turbo"]


async def test_a_model_no_upstream_serves_is_refused_without_asking_any(start: Any, chat: FakeUpstream,
                                                                       backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    status, body = await ask(client, "gpt-4")
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert chat.requests == backup.requests == []


# --- fall-over before the first answer event -----------------------------------------------------------

@pytest.mark.parametrize("failure", [
    Fail(503, "overloaded"),
    Fail(500, "internal"),
    Fail(429, "rate limited", headers={"Retry-After": "30"}),
    Fail(401, "Incorrect API key provided.", code="invalid_api_key"),
    RawStream(chunks=[b": keep-alive\n\n"], end="eof"),  # 200, no event, then the body ends
], ids=["503", "500", "429", "401", "ended-before-an-event"])
async def test_a_failure_before_the_first_event_moves_the_question_to_the_next_upstream_once(
        start: Any, chat: FakeUpstream, backup: FakeUpstream, failure: Fail | RawStream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(failure)
    status, body = await ask(client, "shared")
    assert (status, text_of(body)) == (200, "from upstream")
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 1)
    assert backup.chat_requests()[0].body["model"] == "shared"


async def test_an_unreachable_upstream_falls_over_to_the_next(start: Any, backup: FakeUpstream) -> None:
    client = await start(layout(closed_url(), backup))
    status, body = await ask(client, "shared", stream=True)
    assert status == 200
    assert '"content": "upstream"' in body and body.endswith("data: [DONE]\n\n")
    assert len(backup.chat_requests()) == 1


async def test_a_timeout_before_the_first_event_falls_over(start: Any, chat: FakeUpstream,
                                                           backup: FakeUpstream) -> None:
    raw = layout(chat, backup)
    raw["upstream"]["read_timeout"] = 0.3
    client = await start(raw)
    chat.script.append(RawStream(chunks=[b": keep-alive\n\n"], end="hang"))  # headers, a comment, then nothing
    status, body = await ask(client, "shared")
    assert (status, text_of(body)) == (200, "from upstream")
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 1)


async def test_no_fall_over_after_the_first_event(start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(RawStream(chunks=[sse_chunk(None), sse_chunk("half an")], end="reset"))
    status, body = await ask(client, "shared", stream=True)
    assert status == 200
    assert "half an" in body and '"error"' in body and "[DONE]" not in body
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 0)


async def test_a_request_the_upstream_calls_bad_is_not_sent_to_another(start: Any, chat: FakeUpstream,
                                                                      backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(Fail(400, "messages: too long"))
    status, body = await ask(client, "shared")
    assert (status, body["error"]["message"]) == (400, "messages: too long")
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 0)


async def test_when_every_upstream_fails_the_client_gets_one_error_and_the_quota_back(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start({**layout(chat, backup), "quota": {"daily_questions": 1}})
    chat.script.append(Fail(503, "down"))
    backup.script.append(Fail(502, "also down"))
    status, _ = await ask(client, "shared", headers={})  # anonymous: charged against the day quota
    assert status == 502
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 1)
    status, body = await ask(client, "shared", headers={})  # refunded: the one question of the day is left
    assert (status, text_of(body)) == (200, "from upstream")


async def test_an_upstream_whose_keys_all_cool_is_skipped_without_a_request(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(Fail(429, "slow down", headers={"Retry-After": "60"}))
    assert (await ask(client, "shared"))[0] == 200
    assert (await ask(client, "shared"))[0] == 200  # the only key of the first upstream is cooling
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (1, 2)
    assert models_asked(backup) == ["shared", "shared"]


async def test_the_key_retry_runs_inside_an_upstream_before_it_falls_over(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup, first={"api_keys": [CHAT_KEY, CHAT_KEY_2]}))
    chat.script.extend([Fail(429, "slow down"), Fail(429, "slow down")])
    status, body = await ask(client, "shared")
    assert (status, text_of(body)) == (200, "from upstream")
    assert [r.authorization for r in chat.chat_requests()] == [f"Bearer {CHAT_KEY}", f"Bearer {CHAT_KEY_2}"]
    assert len(backup.chat_requests()) == 1


async def test_an_upstream_with_an_unset_key_variable_has_an_empty_pool_and_is_skipped(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    raw = layout(chat, backup)
    del raw["upstreams"][0]["api_keys"]
    raw["upstreams"][0]["api_keys_env"] = "CHAT_UPSTREAM_KEYS"
    client = await start(raw, env={})
    status, body = await ask(client, "shared")
    assert (status, text_of(body)) == (200, "from upstream")
    assert (len(chat.chat_requests()), len(backup.chat_requests())) == (0, 1)
    status, _ = await ask(client, "deepseek-chat")  # served by that upstream alone
    assert status == 503


# --- a caller's own key ---------------------------------------------------------------------------------

async def test_a_callers_own_key_goes_to_the_upstream_serving_the_model_and_nowhere_else(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    assert (await ask(client, "gpt-4o-mini", headers=OWN))[0] == 200
    assert (await ask(client, "some-model-nobody-lists", headers=OWN))[0] == 200  # the first upstream
    assert [(r.body["model"], r.authorization) for r in backup.chat_requests()] == [("gpt-4o-mini", f"Bearer {USER_KEY}")]
    assert [(r.body["model"], r.authorization) for r in chat.chat_requests()] == [
        ("some-model-nobody-lists", f"Bearer {USER_KEY}")]
    chat.script.append(Fail(503, "down"))
    status, _ = await ask(client, "shared", headers=OWN)  # never shown to a second provider
    assert status == 502
    assert len(backup.chat_requests()) == 1


# --- pictures ----------------------------------------------------------------------------------------------

async def test_pictures_go_to_the_upstream_that_draws_asked_for_the_image_model(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    response = await client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=TRUSTED)
    assert response.status == 200, await response.text()
    async with ws_connect(client) as ws:
        await ws.send_json({"conversationId": "c", "authType": "api", "authValue": f"Bearer {USER_KEY}",
                            "isGenImg": True, "content": "a dog", "messages": []})
        frames = await receive_answer(ws)
    assert frames[0]["isImg"] is True
    assert chat.requests == []
    assert [(r.body["model"], r.body["prompt"], r.authorization) for r in backup.image_requests()] == [
        ("gpt-image-1", "a cat", f"Bearer {PICTURE_KEY}"), ("gpt-image-1", "a dog", f"Bearer {USER_KEY}")]


async def test_pictures_fall_over_between_upstreams_that_draw(start: Any, chat: FakeUpstream,
                                                              backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup, first={"images": True, "models": ["deepseek-chat", "gpt-image-1"]}))
    chat.image_failures.append(Fail(503, "busy"))
    response = await client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=TRUSTED)
    assert response.status == 200, await response.text()
    assert (len(chat.image_requests()), len(backup.image_requests())) == (1, 1)


async def test_with_no_upstream_that_draws_pictures_are_refused(start: Any, chat: FakeUpstream,
                                                                backup: FakeUpstream) -> None:
    raw = layout(chat, backup, second={"images": False})
    raw["models"] = {"default": "deepseek-chat"}
    client = await start(raw)
    async with ws_connect(client) as ws:
        await ws.send_json({"conversationId": "c", "authType": "api", "authValue": "Bearer ", "isDemo": True,
                            "isGenImg": True, "content": "a dog", "messages": []})
        frames = await receive_answer(ws)
    assert (frames[-1]["content"], frames[-1]["isSuccess"]) == (texts.NO_IMAGES, False)
    assert chat.requests == backup.requests == []


# --- the one-upstream shorthand ---------------------------------------------------------------------------

async def test_the_upstream_shorthand_and_openai_api_key_are_one_upstream_named_default(
        start: Any, chat: FakeUpstream) -> None:
    client = await start({"upstream": {"base_url": chat.base_url, "models": ["gpt-3.5-turbo", "gpt-4o"]},  # type: ignore[attr-defined]
                          "admin": {"token": ADMIN_TOKEN}, "api": {"client_tokens": [CLIENT_TOKEN]}},
                         env={"OPENAI_API_KEY": f"{CHAT_KEY},{CHAT_KEY_2}"})
    assert (await ask(client, None))[0] == 200
    assert (await ask(client, "gpt-4o"))[0] == 200
    assert [(r.body["model"], r.authorization) for r in chat.chat_requests()] == [
        ("gpt-3.5-turbo", f"Bearer {CHAT_KEY}"), ("gpt-4o", f"Bearer {CHAT_KEY_2}")]
    body = await (await client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
    assert [(u["name"], u["models"], u["images"], [k["key"] for k in u["keys"]]) for u in body["upstreams"]] == [
        ("default", ["gpt-3.5-turbo", "gpt-4o"], True, ["…0001", "…0002"])]


# --- what the operator sees ------------------------------------------------------------------------------

async def test_admin_upstreams_shows_each_upstream_with_its_health_and_masked_keys(
        start: Any, chat: FakeUpstream, backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(Fail(503, "down"))
    assert (await ask(client, "shared"))[0] == 200
    response = await client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    text = await response.text()
    assert CHAT_KEY not in text and PICTURE_KEY not in text
    body = json.loads(text)
    host = lambda fake: fake.base_url.split("/")[2]  # noqa: E731
    assert body == {"default": "deepseek-chat", "image": "gpt-image-1", "aliases": {"gpt-3.5-turbo": "deepseek-chat"},
                    "upstreams": [
        {"name": "deepseek", "host": host(chat), "models": ["deepseek-chat", "deepseek-reasoner", "shared"],
         "images": False, "usage": True, "reachable": False, "usable": 1,
         "keys": [{"key": "…0001", "state": "healthy", "until": None, "reason": None, "requests": 1, "failures": 1}]},
        {"name": "pictures", "host": host(backup), "models": ["gpt-4o-mini", "shared", "gpt-image-1"],
         "images": True, "usage": True, "reachable": True, "usable": 1,
         "keys": [{"key": "…0003", "state": "healthy", "until": None, "reason": None, "requests": 1, "failures": 0}]},
    ]}


async def test_metrics_label_upstream_errors_by_upstream(start: Any, chat: FakeUpstream,
                                                         backup: FakeUpstream) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(Fail(503, "down"))
    assert (await ask(client, "shared"))[0] == 200
    text = await (await client.get("/metrics")).text()
    assert 'chatgpt_upstream_errors_total{key="…0001",status="503",upstream="deepseek"} 1.0' in text
    assert 'chatgpt_upstream_errors_total{key="…0003"' not in text  # the upstream that answered had no error
    # Tokens are counted on the upstream that answered.
    assert 'chatgpt_tokens_total{kind="prompt",model="shared",payer="trusted",upstream="pictures"} 9.0' in text


async def test_each_upstreams_key_health_survives_a_restart_under_its_own_name(
        start: Any, chat: FakeUpstream, backup: FakeUpstream, tmp_path: Path) -> None:
    client = await start(layout(chat, backup))
    chat.script.append(Fail(401, "Incorrect API key provided.", code="invalid_api_key"))
    assert (await ask(client, "shared"))[0] == 200
    await client.close()  # the state file is written at shutdown
    saved = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert {"keys.deepseek", "keys.pictures"} <= set(saved) and "keys" not in saved
    again = await start(layout(chat, backup))
    body = await (await again.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
    assert [[k["state"] for k in u["keys"]] for u in body["upstreams"]] == [["disabled"], ["healthy"]]
