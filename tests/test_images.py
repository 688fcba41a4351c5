"""Generated pictures (PROTOCOL.md A.6, B.1): drawn over the websocket and /v1, saved, served, pruned."""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from chatgpt.domain import texts
from chatgpt.domain.errors import UpstreamBroken
from chatgpt.domain.provider import GeneratedImage
from chatgpt.faces.markdown import to_html
from chatgpt.server.images import ImageStore, Pruner, folder_usage, prune, seconds_until
from tests.conftest import CLIENT_TOKEN, SERVER_KEY, USER_KEY, MakeClient, url, ws_connect
from tests.helpers.frames import receive_answer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG = PNG_SIGNATURE + bytes(range(256)) * 4  # the server checks the signature, not the whole picture
OTHER_PNG = PNG_SIGNATURE + bytes(range(255, -1, -1)) * 3
HTML = b"<html><body>Access denied</body></html>"
SAFETY = "Your request was rejected by the safety system"
OURS = re.compile(r"^[0-9a-f]{32}\.png$")
HEX_NAME = "0123456789abcdef0123456789abcdef.png"
ADMIN_TOKEN = "t0k3n-admin-images"


# --- a fake image upstream -------------------------------------------------------------------

@dataclass
class UrlAnswer:
    """Answer with a URL to this fake's own `GET /pic/<n>`, which serves `body` in `pieces`."""

    body: bytes = PNG
    content_type: str = "image/png"
    pieces: int = 1  # >1: the body is written in this many parts, `delay` seconds apart
    delay: float = 0.0
    drawing: float = 0.0  # seconds the upstream takes to draw before it answers the generation request


@dataclass
class B64Answer:
    """Answer with the picture inline as `b64_json`."""

    body: bytes = PNG


@dataclass
class ErrorAnswer:
    """Answer with an HTTP error status and OpenAI's error JSON."""

    status: int
    message: str


@dataclass
class Seen:
    authorization: str | None
    body: Any


@dataclass
class FakeImages:
    """A real upstream serving `POST /v1/images/generations` as scripted, and the pictures it links."""

    script: deque[UrlAnswer | B64Answer | ErrorAnswer] = field(default_factory=deque)
    default: UrlAnswer | B64Answer | ErrorAnswer = field(default_factory=UrlAnswer)
    requests: list[Seen] = field(default_factory=list)
    downloads: int = 0
    origin: str = ""
    pictures: dict[str, UrlAnswer] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_get("/pic/{n}", self.picture)
        return app

    async def generations(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(request.headers.get("Authorization"), await request.json()))
        answer = self.script.popleft() if self.script else self.default
        if isinstance(answer, UrlAnswer) and answer.drawing:
            await asyncio.sleep(answer.drawing)
        if isinstance(answer, ErrorAnswer):
            return web.json_response({"error": {"message": answer.message}}, status=answer.status)
        if isinstance(answer, B64Answer):
            item = {"b64_json": base64.b64encode(answer.body).decode()}
        else:
            name = f"{len(self.pictures)}.png"
            self.pictures[name] = answer
            item = {"url": f"{self.origin}/pic/{name}"}
        return web.json_response({"created": 1, "data": [item]})

    async def picture(self, request: web.Request) -> web.StreamResponse:
        self.downloads += 1
        answer = self.pictures[request.match_info["n"]]
        response = web.StreamResponse(headers={"Content-Type": answer.content_type})
        await response.prepare(request)
        size = max(1, -(-len(answer.body) // answer.pieces))
        for start in range(0, len(answer.body), size):
            if start and answer.delay:
                await asyncio.sleep(answer.delay)
            await response.write(answer.body[start:start + size])
        await response.write_eof()
        return response


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeImages:
    """The running fake image upstream."""
    fake = FakeImages()
    server = await aiohttp_server(fake.app())
    fake.origin = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The images folder the test settings point at."""
    return tmp_path / "images"


async def start(make_client: MakeClient, upstream: FakeImages, **overrides: Any) -> TestClient:
    """The real app paying with SERVER_KEY at the fake image upstream."""
    overrides["upstream"] = {"base_url": upstream.base_url, **overrides.get("upstream", {})}
    return await make_client(**overrides)


# --- helpers -----------------------------------------------------------------------------------

def draw(prompt: str = "a cat", **fields: Any) -> dict[str, Any]:
    """An image question as the mini-program sends it (anonymous user unless overridden)."""
    frame: dict[str, Any] = {
        "conversationId": "c-img", "id": "u-1", "parentId": 1, "authType": "api", "authValue": "Bearer ",
        "isDemo": True, "content": prompt, "isGenImg": True, "isSender": False, "messages": [],
    }
    frame.update(fields)
    return frame


OWN_KEY = {"authValue": f"Bearer {USER_KEY}", "isDemo": False}


async def ask(client: TestClient, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """One question on a fresh socket; its frames."""
    async with ws_connect(client) as ws:
        await ws.send_json(frame)
        return await receive_answer(ws)


def error_frames(frames: list[dict[str, Any]], message: str) -> list[dict[str, Any]]:
    """What an answer ending in `message` must look like (createTime taken from the frame)."""
    return [{"conversationId": "c-img", "role": "assistant", "content": message, "html": to_html(message),
             "createTime": frames[0]["createTime"], "isDone": True, "isSuccess": False}]


async def get_raw(client: TestClient, path: str) -> aiohttp.ClientResponse:
    """GET `path` exactly as written (no client-side normalisation of `..` or escapes)."""
    return await client.session.get(yarl.URL(url(client, path), encoded=True))


def files_in(folder: Path) -> list[str]:
    """Everything in the folder, hidden and temp files included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def save(folder: Path, name: str, data: bytes, age: float = 0.0, now: float | None = None) -> Path:
    """A file in the folder whose mtime is `age` seconds before `now`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    mtime = (time.time() if now is None else now) - age
    os.utime(path, (mtime, mtime))
    return path


def hex_name(n: int) -> str:
    """A name matching the server's own pattern."""
    return f"{n:032x}.png"


# --- the websocket ------------------------------------------------------------------------------

@pytest.mark.parametrize("payer, authorization", [({}, f"Bearer {SERVER_KEY}"),
                                                  (OWN_KEY, f"Bearer {USER_KEY}")])
async def test_image_question_answers_an_image_frame_then_done_and_serves_the_downloaded_bytes(
        make_client: MakeClient, upstream: FakeImages, folder: Path, payer: dict[str, Any],
        authorization: str) -> None:
    client = await start(make_client, upstream, server={"public_url": "https://img.example.com"})
    frames = await ask(client, draw(**payer))
    picture, end = frames
    name = picture["url"].removeprefix("https://img.example.com/res/")
    assert OURS.match(name)
    assert picture == {"conversationId": "c-img", "id": name.removesuffix(".png"), "role": "assistant",
                       "content": "[图片]", "html": "[图片]", "url": f"https://img.example.com/res/{name}",
                       "isImg": True, "createTime": picture["createTime"], "isDone": False, "isSuccess": True}
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", picture["createTime"])
    assert end == {"conversationId": "c-img", "role": "assistant", "content": "DONE", "html": "DONE",
                   "createTime": end["createTime"], "isDone": True, "isSuccess": True}
    assert [(r.authorization, r.body) for r in upstream.requests] == [
        (authorization, {"prompt": "a cat", "n": 1, "size": "256x256"})]
    assert files_in(folder) == [name]
    response = await client.get(f"/res/{name}")
    assert response.status == 200
    assert await response.read() == PNG
    assert response.content_type == "image/png"
    max_age = re.search(r"max-age=(\d+)", response.headers["Cache-Control"])
    assert max_age is not None and int(max_age.group(1)) > 0


async def test_b64_answer_is_decoded_and_served_byte_identical(make_client: MakeClient, upstream: FakeImages,
                                                               folder: Path) -> None:
    upstream.script.append(B64Answer(OTHER_PNG))
    client = await start(make_client, upstream)
    picture, end = await ask(client, draw())
    assert picture["url"].startswith("http://127.0.0.1:8080/res/")
    name = picture["url"].rsplit("/", 1)[1]
    assert (end["content"], end["isDone"]) == ("DONE", True)
    assert upstream.downloads == 0
    for path in (f"/res/{name}", f"//res/{name}"):  # the mini-program's double slash too
        response = await client.session.get(url(client, path))
        assert (response.status, response.content_type, await response.read()) == (200, "image/png", OTHER_PNG)


async def test_the_configured_size_is_asked_upstream(make_client: MakeClient, upstream: FakeImages) -> None:
    client = await start(make_client, upstream, images={"size": "512x512"})
    await ask(client, draw("a dog"))
    assert upstream.requests[0].body == {"prompt": "a dog", "n": 1, "size": "512x512"}


async def test_upstream_refusal_is_an_error_frame_with_its_message_and_no_file(
        make_client: MakeClient, upstream: FakeImages, folder: Path) -> None:
    upstream.script.append(ErrorAnswer(400, SAFETY))
    client = await start(make_client, upstream)
    frames = await ask(client, draw())
    assert frames == error_frames(frames, SAFETY)
    assert len(upstream.requests) == 1  # a 400 is not retried on another key
    assert files_in(folder) == []


@pytest.mark.parametrize("answer", [UrlAnswer(HTML, content_type="image/png"), UrlAnswer(b""),
                                    B64Answer(HTML)], ids=["html-download", "empty-download", "html-b64"])
async def test_a_picture_that_is_not_an_image_is_an_upstream_failure_and_leaves_no_file(
        make_client: MakeClient, upstream: FakeImages, folder: Path, answer: UrlAnswer | B64Answer) -> None:
    upstream.script.append(answer)
    client = await start(make_client, upstream)
    frames = await ask(client, draw())
    assert frames == error_frames(frames, texts.UPSTREAM_FAILED)
    assert files_in(folder) == []  # no picture and no `.part` temp file


async def test_a_picture_whose_first_network_chunk_is_shorter_than_its_signature_is_saved(
        make_client: MakeClient, upstream: FakeImages) -> None:
    # A network read may return fewer bytes than the 8-byte PNG signature; the type check must
    # wait for enough bytes instead of calling the picture "not an image".
    upstream.script.append(UrlAnswer(PNG, pieces=len(PNG) // 4, delay=0.0005))
    client = await start(make_client, upstream)
    frames = await ask(client, draw())
    assert [f["content"] for f in frames] == ["[图片]", "DONE"]
    response = await client.get(f"/res/{frames[0]['url'].rsplit('/', 1)[1]}")
    assert await response.read() == PNG


async def test_a_slow_download_does_not_hold_up_heartbeats(make_client: MakeClient, upstream: FakeImages) -> None:
    upstream.script.append(UrlAnswer(PNG, pieces=4, delay=0.15))
    client = await start(make_client, upstream)
    async with ws_connect(client) as ws:
        await ws.send_json(draw())
        await asyncio.sleep(0.1)  # the download is under way
        await ws.send_json({"heart": "ping"})
        first = await asyncio.wait_for(ws.receive_json(), 5)
        rest = await receive_answer(ws)
    assert first["heart"] == "pong"
    assert [f["content"] for f in rest] == ["[图片]", "DONE"]


async def test_a_download_over_the_time_cap_fails_and_leaves_no_file(
        make_client: MakeClient, upstream: FakeImages, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream.script.append(UrlAnswer(PNG, pieces=3, delay=1.0))
    client = await start(make_client, upstream, images={"download_seconds": 0.3})  # 60 s in production
    started = time.monotonic()
    frames = await ask(client, draw())
    assert time.monotonic() - started < 1.5
    assert frames == error_frames(frames, texts.UPSTREAM_FAILED)
    assert files_in(folder) == []


async def test_a_client_leaving_mid_download_leaves_no_temp_file(make_client: MakeClient, upstream: FakeImages,
                                                                 folder: Path) -> None:
    upstream.script.append(UrlAnswer(PNG, pieces=4, delay=0.2))
    client = await start(make_client, upstream)
    async with ws_connect(client) as ws:
        await ws.send_json(draw())
        deadline = time.monotonic() + 2
        while not any(n.endswith(".part") for n in files_in(folder)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert [n for n in files_in(folder) if n.endswith(".part")] != []  # the download was under way
    await asyncio.sleep(0.3)
    assert files_in(folder) == []


async def test_the_anonymous_quota_is_given_back_when_the_picture_failed(make_client: MakeClient,
                                                                         upstream: FakeImages) -> None:
    upstream.script.extend([ErrorAnswer(400, SAFETY), UrlAnswer()])
    client = await start(make_client, upstream, quota={"daily_questions": 1})
    failed = await ask(client, draw())
    succeeded = await ask(client, draw())
    used_up = await ask(client, draw())
    assert [f["content"] for f in failed] == [SAFETY]
    assert [f["content"] for f in succeeded] == ["[图片]", "DONE"]
    assert used_up == error_frames(used_up, texts.QUOTA_USED_UP)
    assert len(upstream.requests) == 2


async def test_a_blank_image_prompt_is_refused_without_asking_upstream(make_client: MakeClient,
                                                                       upstream: FakeImages) -> None:
    client = await start(make_client, upstream)
    frames = await ask(client, draw("   "))
    assert frames == error_frames(frames, texts.PROMPT_EMPTY)
    assert upstream.requests == []


async def test_the_offline_provider_draws_a_real_256_png_served_at_res(make_client: MakeClient, folder: Path) -> None:
    client = await make_client(upstream={"api_keys": []})
    picture, end = await ask(client, draw())
    assert (picture["isImg"], end["content"]) == (True, "DONE")
    name = picture["url"].rsplit("/", 1)[1]
    response = await client.get(f"/res/{name}")
    data = await response.read()
    assert (response.status, response.content_type) == (200, "image/png")
    assert data.startswith(PNG_SIGNATURE)
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (256, 256)
    assert files_in(folder) == [name]


# --- /v1/images/generations ------------------------------------------------------------------

async def test_v1_answers_a_url_on_this_server(make_client: MakeClient, upstream: FakeImages, folder: Path) -> None:
    client = await start(make_client, upstream, server={"public_url": "https://img.example.com/"})
    response = await client.post("/v1/images/generations", json={"prompt": "a cat"},
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    body = await response.json()
    assert response.status == 200
    assert set(body) == {"created", "data"} and isinstance(body["created"], int)
    assert len(body["data"]) == 1 and set(body["data"][0]) == {"url"}
    name = body["data"][0]["url"].removeprefix("https://img.example.com/res/")
    assert OURS.match(name) and files_in(folder) == [name]
    assert [(r.authorization, r.body) for r in upstream.requests] == [
        (f"Bearer {SERVER_KEY}", {"prompt": "a cat", "n": 1, "size": "256x256"})]
    assert await (await client.get(f"/res/{name}")).read() == PNG


@pytest.mark.parametrize("answer", [UrlAnswer(OTHER_PNG), B64Answer(OTHER_PNG)], ids=["url", "b64"])
async def test_v1_answers_b64_json_of_the_saved_bytes_when_asked(make_client: MakeClient, upstream: FakeImages,
                                                                 answer: UrlAnswer | B64Answer) -> None:
    upstream.script.append(answer)
    client = await start(make_client, upstream)
    response = await client.post("/v1/images/generations",
                                 json={"prompt": "a cat", "response_format": "b64_json", "n": 1},
                                 headers={"Authorization": f"Bearer {USER_KEY}"})
    body = await response.json()
    assert response.status == 200
    assert len(body["data"]) == 1 and set(body["data"][0]) == {"b64_json"}
    assert base64.b64decode(body["data"][0]["b64_json"]) == OTHER_PNG
    assert upstream.requests[0].authorization == f"Bearer {USER_KEY}"


async def test_v1_size_is_the_callers_on_its_own_key_and_the_configured_one_on_the_pool(
        make_client: MakeClient, upstream: FakeImages) -> None:
    client = await start(make_client, upstream)
    for token in (USER_KEY, CLIENT_TOKEN):
        response = await client.post("/v1/images/generations", json={"prompt": "a cat", "size": "512x512"},
                                     headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
    assert [r.body["size"] for r in upstream.requests] == ["512x512", "256x256"]


@pytest.mark.parametrize("body, message, param", [
    ({}, "'prompt' must be a non-empty string.", "prompt"),
    ({"prompt": "  "}, "'prompt' must be a non-empty string.", "prompt"),
    ({"prompt": "a cat", "n": 2}, "Only n=1 is supported.", "n"),
    ({"prompt": "a cat", "response_format": "png"}, "'response_format' must be 'url' or 'b64_json'.",
     "response_format"),
    ({"prompt": "a cat", "size": "huge"}, "'size' must look like 1024x1024.", "size"),
])
async def test_v1_bad_input_is_a_400_openai_error_without_asking_upstream(
        make_client: MakeClient, upstream: FakeImages, body: dict[str, Any], message: str, param: str) -> None:
    client = await start(make_client, upstream)
    response = await client.post("/v1/images/generations", json=body)
    assert response.status == 400
    assert await response.json() == {"error": {"message": message, "type": "invalid_request_error",
                                               "param": param, "code": "invalid_value"}}
    assert upstream.requests == []


async def test_v1_upstream_refusal_is_a_400_with_its_message(make_client: MakeClient, upstream: FakeImages,
                                                             folder: Path) -> None:
    upstream.script.append(ErrorAnswer(400, SAFETY))
    client = await start(make_client, upstream)
    response = await client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status == 400
    assert await response.json() == {"error": {"message": SAFETY, "type": "invalid_request_error",
                                               "param": None, "code": None}}
    assert files_in(folder) == []


async def test_v1_a_download_that_is_not_an_image_is_a_502_and_leaves_no_file(
        make_client: MakeClient, upstream: FakeImages, folder: Path) -> None:
    upstream.script.append(UrlAnswer(HTML, content_type="image/png"))
    client = await start(make_client, upstream)
    response = await client.post("/v1/images/generations", json={"prompt": "a cat"})
    assert response.status == 502
    assert await response.json() == {"error": {"message": "The upstream's picture could not be downloaded or is not an image.", "type": "api_error",
                                               "param": None, "code": None}}
    assert files_in(folder) == []


# --- ImageStore on its own ---------------------------------------------------------------------

async def test_store_refuses_a_download_over_its_size_limit_and_keeps_nothing(upstream: FakeImages,
                                                                              folder: Path) -> None:
    upstream.pictures["big.png"] = UrlAnswer(PNG_SIGNATURE + bytes(5000), pieces=5)
    upstream.pictures["fits.png"] = UrlAnswer(PNG_SIGNATURE + bytes(992))
    async with aiohttp.ClientSession() as session:
        store = ImageStore(folder, "https://img.example.com/", session, limit=1000)
        with pytest.raises(UpstreamBroken, match="larger than the download limit"):
            await store.store(GeneratedImage(url=f"{upstream.origin}/pic/big.png"))
        assert files_in(folder) == []
        stored = await store.store(GeneratedImage(url=f"{upstream.origin}/pic/fits.png"))  # exactly 1000 bytes
    assert stored.url == f"https://img.example.com/res/{stored.name}"
    assert files_in(folder) == [stored.name] and (folder / stored.name).stat().st_size == 1000


async def test_store_refuses_an_oversized_or_invalid_b64_picture_and_keeps_nothing(folder: Path) -> None:
    async with aiohttp.ClientSession() as session:
        store = ImageStore(folder, "http://h", session, limit=1000)
        with pytest.raises(UpstreamBroken, match="larger than the download limit"):
            await store.store(GeneratedImage(b64=base64.b64encode(PNG_SIGNATURE + bytes(5000)).decode()))
        with pytest.raises(UpstreamBroken, match="not valid base64"):
            await store.store(GeneratedImage(b64="not base64!"))
        with pytest.raises(UpstreamBroken, match="not an image"):
            await store.store(GeneratedImage(b64=base64.b64encode(HTML).decode()))
    assert files_in(folder) == []


# --- /res safety ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/res/..%2f{secret}", "/res/%2e%2e%2f{secret}", "/res/%2E%2E%2F{secret}", "/res/../{secret}",
    "/res/%2e%2e/{secret}", "/res/..%5c{secret}", "//res/..%2f{secret}", "/res/..",
    "/res/{abs}", "/res/%2F{abs_encoded}", "/res//{abs}",
    "/res/.hidden.png", "/res/notes.txt", "/res/photo.png", "/res/{link}", "/res/.{stem}.part",
    "/res/{stem}.PNG", "/res/{folder_as_file}", "/res/{missing}",
])
async def test_res_serves_nothing_but_our_own_pictures_inside_the_folder(
        make_client: MakeClient, upstream: FakeImages, tmp_path: Path, folder: Path, path: str) -> None:
    client = await start(make_client, upstream)
    secret = save(tmp_path, HEX_NAME, b"\x89PNG\r\n\x1a\nSECRET outside the folder")
    save(folder, ".hidden.png", PNG)
    save(folder, "notes.txt", b"operator notes")
    save(folder, "photo.png", PNG)
    stem = "fedcba9876543210fedcba9876543210"
    save(folder, f".{stem}.part", PNG)  # a picture still being written
    save(folder, f"{stem}.PNG", PNG)
    (folder / hex_name(7)).symlink_to(secret)  # named like ours, points outside
    (folder / hex_name(8)).mkdir()
    absolute = str(secret).lstrip("/")
    raw = path.format(secret=HEX_NAME, abs=absolute, abs_encoded=absolute.replace("/", "%2F"),
                      link=hex_name(7), stem=stem, folder_as_file=hex_name(8), missing=hex_name(9))
    response = await get_raw(client, raw)
    assert response.status == 404
    assert b"SECRET" not in await response.read()


# --- prune(), folder_usage(), seconds_until() ---------------------------------------------------

def test_prune_removes_only_our_pictures_older_than_max_age(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    day = 86400.0
    save(tmp_path, hex_name(1), PNG, age=2 * day, now=now)
    save(tmp_path, hex_name(2), PNG, age=day + 1, now=now)
    save(tmp_path, hex_name(3), PNG, age=day - 1, now=now)
    foreign = ["notes.txt", "photo.png", ".hidden.png", f".{hex_name(4)[:-4]}.part", hex_name(5).upper()]
    for name in foreign:
        save(tmp_path, name, PNG, age=10 * day, now=now)
    assert prune(tmp_path, now, day, 10**9) == [hex_name(1), hex_name(2)]
    assert files_in(tmp_path) == sorted([hex_name(3), *foreign])


def test_prune_over_the_size_cap_removes_the_oldest_first_until_under_it(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    for n, age in [(1, 30), (2, 10), (3, 20), (4, 40)]:
        save(tmp_path, hex_name(n), bytes(100), age=age, now=now)
    save(tmp_path, "big-foreign.bin", bytes(10_000), age=1000, now=now)  # not ours: neither counted nor removed
    save(tmp_path, ".0123.part", bytes(10_000), age=1000, now=now)
    assert prune(tmp_path, now, 3600, 250) == [hex_name(4), hex_name(1)]
    assert files_in(tmp_path) == sorted([hex_name(2), hex_name(3), "big-foreign.bin", ".0123.part"])
    assert prune(tmp_path, now, 3600, 200) == []  # exactly at the cap is fine


def test_prune_leaves_symlinks_and_their_targets_alone(tmp_path: Path) -> None:
    outside = save(tmp_path, "outside.png", PNG, age=10**6)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / hex_name(1)).symlink_to(outside)
    assert prune(folder, time.time(), 0, 0) == []
    assert outside.read_bytes() == PNG and (folder / hex_name(1)).is_symlink()


def test_prune_of_a_missing_folder_removes_nothing(tmp_path: Path) -> None:
    assert prune(tmp_path / "nowhere", time.time(), 0, 0) == []


def test_folder_usage_counts_only_our_pictures(tmp_path: Path) -> None:
    assert folder_usage(tmp_path / "nowhere") == (0, 0)
    save(tmp_path, hex_name(1), bytes(100))
    save(tmp_path, hex_name(2), bytes(50))
    save(tmp_path, "notes.txt", bytes(1000))
    save(tmp_path, ".abc.part", bytes(1000))
    assert folder_usage(tmp_path) == (2, 150)


@pytest.mark.parametrize("now, expected", [
    (datetime(2026, 11, 24, 0, 30), 1800.0),
    (datetime(2026, 11, 24, 0, 59, 59, 500_000), 0.5),
    (datetime(2026, 11, 24, 1, 0), 86400.0),
    (datetime(2026, 11, 24, 13, 15), 11 * 3600 + 45 * 60),
])
def test_seconds_until_is_the_wait_for_the_next_daily_time(now: datetime, expected: float) -> None:
    assert seconds_until("01:00", now) == expected


# --- the pruning task ----------------------------------------------------------------------------

def far_prune_at() -> str:
    """A daily time 12 h away, so no daily pass happens during a test."""
    return (datetime.now() + timedelta(hours=12)).strftime("%H:%M")


async def test_pruner_survives_a_failing_pass_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_folder = tmp_path / "images"
    not_a_folder.write_bytes(b"a file where the folder should be")
    pruner = Pruner(not_a_folder, 3600, 10, far_prune_at(), check_every=0.01)
    with caplog.at_level(logging.ERROR, logger="chatgpt.server.images"):
        task = asyncio.create_task(pruner.run_forever())
        await asyncio.sleep(0.2)
        try:
            assert not task.done()
            failures = [r for r in caplog.records if r.name == "chatgpt.server.images" and r.levelno == logging.ERROR]
            assert len(failures) >= 2  # it went on trying after the first failure
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_pruner_prunes_an_over_cap_folder_between_daily_passes(tmp_path: Path) -> None:
    for n, age in [(1, 30), (2, 20), (3, 10)]:
        save(tmp_path, hex_name(n), bytes(100), age=age)
    save(tmp_path, "notes.txt", bytes(1000))
    pruner = Pruner(tmp_path, 10**9, 150, far_prune_at(), check_every=0.01)
    task = asyncio.create_task(pruner.run_forever())
    try:
        deadline = time.monotonic() + 3
        while folder_usage(tmp_path)[1] > 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert files_in(tmp_path) == [hex_name(3), "notes.txt"]
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- the admin API -------------------------------------------------------------------------------

async def test_admin_prune_removes_old_pictures_and_says_which(make_client: MakeClient, upstream: FakeImages,
                                                               folder: Path) -> None:
    client = await start(make_client, upstream, admin={"token": ADMIN_TOKEN})
    old_url = (await ask(client, draw()))[0]["url"]
    old = old_url.rsplit("/", 1)[1]
    os.utime(folder / old, (time.time() - 25 * 3600,) * 2)  # older than the 24 h retention
    fresh = (await ask(client, draw()))[0]["url"].rsplit("/", 1)[1]
    save(folder, "notes.txt", b"operator notes", age=30 * 86400)

    refused = await client.post("/admin/images/prune")
    assert refused.status == 401
    wrong = await client.post("/admin/images/prune", headers={"Authorization": "Bearer wrong"})
    assert wrong.status == 401
    assert files_in(folder) == sorted([old, fresh, "notes.txt"])

    response = await client.post("/admin/images/prune", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status == 200
    assert await response.json() == {"removed": [old]}
    assert files_in(folder) == sorted([fresh, "notes.txt"])
    assert (await client.get(f"/res/{old}")).status == 404
    assert (await client.get(f"/res/{fresh}")).status == 200


async def test_the_picture_gauges_follow_saves_and_prunes_without_a_scan_per_scrape(
        make_client: MakeClient, upstream: FakeImages, folder: Path) -> None:
    from tests.test_operations import scrape, value  # the Prometheus reader of the operations tests

    save(folder, hex_name(1), bytes(300), age=30 * 86400)  # found by the one scan at start (and old)
    client = await start(make_client, upstream, admin={"token": ADMIN_TOKEN})
    _, samples = await scrape(client)
    assert (value(samples, "chatgpt_images_on_disk"), value(samples, "chatgpt_images_on_disk_bytes")) == (1, 300)
    drawn = (await ask(client, draw()))[0]["url"].rsplit("/", 1)[1]
    _, samples = await scrape(client)  # the save itself moved the gauges
    assert (value(samples, "chatgpt_images_on_disk"), value(samples, "chatgpt_images_on_disk_bytes")) == (
        2, 300 + (folder / drawn).stat().st_size)
    save(folder, hex_name(2), bytes(50))  # behind the server's back: a scrape does not look at the folder
    _, samples = await scrape(client)
    assert value(samples, "chatgpt_images_on_disk") == 2
    response = await client.post("/admin/images/prune", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert await response.json() == {"removed": [hex_name(1)]}
    _, samples = await scrape(client)  # a pruning pass measures the folder again
    assert (value(samples, "chatgpt_images_on_disk"), value(samples, "chatgpt_images_on_disk_bytes")) == (
        2, 50 + (folder / drawn).stat().st_size)
