"""The one rule every surface answers failures by (chatgpt/server/failures.py), on a real app on loopback."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from chatgpt.server.failures import answer_failures


class Known(Exception):
    """A failure the surface has an answer for."""


def known(exc: Exception) -> web.StreamResponse | None:
    return web.Response(status=409, text="known") if isinstance(exc, Known) else None


async def raising(request: web.Request) -> web.StreamResponse:
    what = request.match_info["what"]
    raise Known() if what == "known" else web.HTTPConflict(text="aiohttp's") if what == "http" else RuntimeError("boom")


@web.middleware
async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    return await answer_failures(request, handler, known, lambda exc: web.Response(status=500, text="unexpected"))


@pytest.fixture
async def app_client(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> TestClient:  # type: ignore[type-arg]
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/{what}", raising)
    return await aiohttp_client(app)


@pytest.mark.parametrize(("what", "status", "text", "logged"), [
    ("known", 409, "known", False),
    ("http", 409, "aiohttp's", False),  # aiohttp's own answers pass through untouched
    ("unexpected", 500, "unexpected", True),
])
async def test_a_failure_gets_its_answer_and_only_an_unexpected_one_is_logged(
        app_client: TestClient, caplog: pytest.LogCaptureFixture,  # type: ignore[type-arg]
        what: str, status: int, text: str, logged: bool) -> None:
    caplog.set_level(logging.ERROR, logger="chatgpt.server.failures")
    response = await app_client.get(f"/{what}")
    assert response.status == status
    assert await response.text() == text
    tracebacks = [r for r in caplog.records if r.name == "chatgpt.server.failures" and r.exc_info]
    assert [r.getMessage() for r in tracebacks] == ([f"unexpected error on GET /{what}"] if logged else [])
