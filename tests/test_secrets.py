"""Secrets (issue 7): after the whole suite, no server key, user key or admin token appears in any log
line or any response the tests received. conftest.py captures both for the whole session; the check
itself is marked `run_last`, so it runs after every other collected test."""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import SERVER_KEY, USER_KEY, MakeClient, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI
from tests.helpers.capture import ADMIN_SECRET_SOURCE, SecretCapture


def fake_secret() -> str:
    """A made-up secret, built at run time so the scan of the test sources cannot pick it up."""
    return "proof-" + uuid.uuid4().hex


def leaking_app(secret: str) -> web.Application:
    """A deliberately leaky server: the secret in a header, split across two body writes, and in a frame."""
    async def header(request: web.Request) -> web.Response:
        return web.Response(text="nothing here", headers={"X-Debug": secret})

    async def split_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        half = len(secret) // 2
        await response.write(f"key={secret[:half]}".encode())
        await asyncio.sleep(0.05)  # two network reads on the client
        await response.write(f"{secret[half:]};".encode())
        await response.write_eof()
        return response

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"content": f"your key is {secret}"})
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/header", header)
    app.router.add_get("/body", split_body)
    app.router.add_get("/ws", socket)
    return app


def test_a_secret_in_a_log_line_is_found_by_the_check(secret_capture: SecretCapture) -> None:
    separate = SecretCapture()  # not the session's: this proof must not fail the real check
    secret = fake_secret()
    separate.add_secret(secret, "proof")
    logger = logging.getLogger(f"tests.secrets.proof.{uuid.uuid4().hex}")
    logger.propagate = False  # the record reaches only the separate capture, never the root logger
    logger.setLevel(logging.DEBUG)
    logger.addHandler(separate.handler)
    try:
        assert separate.leaks() == []
        logger.info("calling upstream with key %s", secret)
    finally:
        logger.removeHandler(separate.handler)
    [leak] = separate.leaks()
    assert "in log line 0" in leak and "<SECRET>" in leak and secret not in leak  # the report masks it
    assert not any(secret in line for line in secret_capture.lines)


async def test_a_secret_in_a_header_a_streamed_body_or_a_frame_is_found_by_the_check(
        aiohttp_server: Callable[..., Awaitable[TestServer]], secret_capture: SecretCapture) -> None:
    separate = SecretCapture()
    secret = fake_secret()
    separate.add_secret(secret, "proof")
    server = await aiohttp_server(leaking_app(secret))
    async with separate.client_class(server) as client:
        assert separate.leaks() == []
        async with client.get("/header") as response:
            await response.read()
        async with client.get("/body") as response:
            parts = [chunk async for chunk in response.content.iter_any()]  # read as a stream, not .read()
        async with client.ws_connect("/ws") as ws:
            await ws.receive_json()
    assert len(parts) >= 2, "the secret was meant to arrive split over two reads"
    leaks = separate.leaks()
    assert len(leaks) == 3, leaks
    assert all(secret not in leak for leak in leaks)
    assert not any(secret.encode() in body for body in secret_capture.bodies)


async def test_the_session_capture_sees_app_logs_responses_and_the_secrets_of_every_app_started(
        make_client: MakeClient, fake: FakeOpenAI, secret_capture: SecretCapture) -> None:
    lines_before, responses_before, _ = secret_capture.checked()
    admin_token = "adm-" + uuid.uuid4().hex  # only the app's settings can tell the capture about it
    client = await make_client(admin={"token": admin_token})
    fake.script.append(Fail(500, "upstream exploded"))
    async with ws_connect(client) as ws:
        await ws.send_json({"conversationId": "c-s", "authType": "api", "authValue": "Bearer ", "isDemo": True,
                            "messages": [{"role": "user", "content": "hi"}]})
        frame = await asyncio.wait_for(ws.receive_json(), 5)
    response = await client.get("/admin/keys", headers={"Authorization": f"Bearer {admin_token}"})
    keys = await response.read()
    assert frame["content"] == "upstream exploded"
    new_lines = secret_capture.lines[lines_before:]
    assert any("upstream default failed" in line for line in new_lines)  # the app's WARNING, through the root logger
    new_bodies = secret_capture.bodies[responses_before:]
    assert any(b"upstream exploded" in body for body in new_bodies)  # a websocket frame
    assert any(bytes(body) == keys for body in new_bodies)  # an HTTP body
    assert secret_capture.secrets.get(admin_token) == {ADMIN_SECRET_SOURCE}  # taken from the app's settings
    assert SERVER_KEY in secret_capture.secrets


@pytest.mark.run_last
def test_no_server_key_user_key_or_admin_token_appears_in_any_log_line_or_response(
        secret_capture: SecretCapture) -> None:
    lines, responses, size = secret_capture.checked()
    admin_tokens = [s for s, sources in secret_capture.secrets.items() if ADMIN_SECRET_SOURCE in sources]
    print(f"secrets check: {len(secret_capture.secrets)} secrets ({len(admin_tokens)} admin tokens) "
          f"in {lines} log lines and {responses} responses, {size} bytes")
    # Not a vacuous pass: the keys the suite uses are on the list, and something was captured.
    assert {SERVER_KEY, USER_KEY} <= set(secret_capture.secrets) and admin_tokens
    assert lines > 0 and responses > 0
    assert secret_capture.leaks() == []
