"""The mini-program's websocket, driven with exactly the frames PROTOCOL.md A.3 shows."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.faces.markdown import to_html
from tests.conftest import USER_KEY, MakeClient, ws_connect
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer


async def test_streamed_answer_is_cumulative_with_one_id_and_one_end_frame(client: TestClient,
                                                                            fake: FakeOpenAI) -> None:
    fake.script.append(Stream(delay=0.05))  # pieces far enough apart that none is coalesced
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    pieces, end = frames[:-1], frames[-1]
    assert [f["content"] for f in pieces] == ["Hello", "Hello, ", "Hello, **world**", "Hello, **world**!"]
    assert len({f["id"] for f in pieces}) == 1  # one id on every frame of the answer: the server's own
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{20}", pieces[0]["id"])
    for f in pieces:
        assert f["html"] == to_html(f["content"])
        assert (f["conversationId"], f["role"], f["isDone"], f["isSuccess"]) == ("c-1", "assistant", False, True)
        assert set(f) == {"conversationId", "id", "role", "content", "html", "createTime", "isDone", "isSuccess"}
    assert "<strong>world</strong>" in pieces[-1]["html"]
    assert set(end) == {"conversationId", "role", "content", "html", "createTime", "isDone", "isSuccess"}
    assert (end["content"], end["html"], end["isDone"], end["isSuccess"]) == ("DONE", "DONE", True, True)


@pytest.mark.parametrize("cid", ["c-1", 42, 4.5])
async def test_conversation_id_is_echoed_with_its_json_type(client: TestClient, cid: Any) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json(question(conversationId=cid))
        frames = await receive_answer(ws)
    assert all(type(f["conversationId"]) is type(cid) and f["conversationId"] == cid for f in frames)


async def test_socket_stays_open_across_questions_and_heartbeats(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        for n in range(3):
            await ws.send_json({"heart": "ping"})
            pong = await ws.receive_json()
            assert pong["heart"] == "pong" and isinstance(pong["time"], int)
            await ws.send_json(question(conversationId=f"c-{n}"))
            frames = await receive_answer(ws)
            assert frames[-1]["content"] == "DONE" and frames[-1]["conversationId"] == f"c-{n}"
        assert not ws.closed


async def test_both_single_and_double_slash_paths_upgrade(client: TestClient) -> None:
    for path in ("/websocket", "//websocket"):
        async with ws_connect(client, path) as ws:
            await ws.send_json({"heart": "ping"})
            assert (await ws.receive_json())["heart"] == "pong"


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_error_frame_carries_the_upstream_message(make_client: MakeClient, fake: FakeOpenAI,
                                                        status: int) -> None:
    client = await make_client()
    fake.script.extend([Fail(status, f"upstream says {status}")] * 2)  # the pool retries 401/429 once
    async with ws_connect(client) as ws:
        await ws.send_json(question(authValue=f"Bearer {USER_KEY}", isDemo=False))
        frames = await receive_answer(ws)
    assert frames == [{"conversationId": "c-1", "role": "assistant", "content": f"upstream says {status}",
                       "html": to_html(f"upstream says {status}"), "createTime": frames[0]["createTime"],
                       "isDone": True, "isSuccess": False}]


async def test_upstream_without_a_message_gives_the_generic_failure_text(client: TestClient,
                                                                         fake: FakeOpenAI) -> None:
    fake.script.append(Fail(502, raw=b"<html>Bad gateway</html>"))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == [texts.UPSTREAM_FAILED]


async def test_stream_dropped_before_done_ends_in_an_error_and_is_never_posted_twice(
        client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(pieces=["partial ", "answer"], done=False))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
        await asyncio.sleep(0.3)  # a reconnecting SSE client would re-POST here
    assert frames[-1]["isSuccess"] is False and frames[-1]["content"] == texts.UPSTREAM_FAILED
    assert [f["content"] for f in frames[:-1]][-1] == "partial answer"
    assert len(fake.chat_requests()) == 1


async def test_own_key_is_sent_upstream_unchanged(client: TestClient, fake: FakeOpenAI) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json(question(authValue=f"Bearer {USER_KEY}", isDemo=False))
        await receive_answer(ws)
    assert fake.chat_requests()[0].authorization == f"Bearer {USER_KEY}"


async def test_context_keeps_role_and_content_only_and_drops_blanks(client: TestClient, fake: FakeOpenAI) -> None:
    history = [
        {"role": "user", "content": "first", "html": "x", "isSend": True},
        {"role": "assistant", "content": "  ", "html": "", "isSend": False},
        {"role": "assistant", "content": "reply", "html": "<p>reply</p>", "isDone": True},
        {"role": "user", "content": "second", "id": "u-2"},
    ]
    async with ws_connect(client) as ws:
        await ws.send_json(question(messages=history))
        await receive_answer(ws)
    assert fake.chat_requests()[0].body["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"}]


async def test_context_is_trimmed_oldest_first_to_the_budget(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"context_chars": 25, "system_prompt": "Be brief."})
    history = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 10},
               {"role": "user", "content": "c" * 10}]
    async with ws_connect(client) as ws:
        await ws.send_json(question(messages=history))
        await receive_answer(ws)
    assert fake.chat_requests()[0].body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "b" * 10},
        {"role": "user", "content": "c" * 10}]


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"', "42", "null", '{"messages": "x"',
                                 json.dumps(question(messages="oops")), json.dumps(question(isDemo="yes")),
                                 json.dumps(question(content=5)), json.dumps(question(messages=[1, 2])),
                                 json.dumps(question(conversationId={"a": 1}))])
async def test_malformed_frames_get_an_error_frame_and_the_socket_stays_open(client: TestClient, raw: str) -> None:
    async with ws_connect(client) as ws:
        await ws.send_str(raw)
        frame = await asyncio.wait_for(ws.receive_json(), 5)
        assert frame["isDone"] is True and frame["isSuccess"] is False
        assert isinstance(frame["content"], str) and frame["content"]
        await ws.send_json({"heart": "ping"})
        assert (await ws.receive_json())["heart"] == "pong"


async def test_binary_frame_gets_an_error_frame(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        await ws.send_bytes(b"\x00\x01")
        frame = await ws.receive_json()
        assert frame["content"] == texts.FRAME_NOT_JSON and "conversationId" not in frame


async def test_token_mode_is_refused_clearly(client: TestClient, fake: FakeOpenAI) -> None:
    async with ws_connect(client) as ws:
        frame_in = question(isDemo=False, authValue="Bearer some-access-token")
        del frame_in["authType"]
        await ws.send_json(frame_in)
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == [texts.TOKEN_MODE_GONE]
    assert fake.chat_requests() == []


async def test_blank_api_key_is_refused(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json(question(isDemo=False, authValue="Bearer "))
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == [texts.API_KEY_BLANK]


async def test_empty_context_is_refused(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json(question(messages=[{"role": "user", "content": "   "}]))
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == [texts.MESSAGES_EMPTY]


async def test_inbound_frames_of_one_mebibyte_are_accepted(client: TestClient, fake: FakeOpenAI) -> None:
    padding = [{"role": "assistant", "content": "x", "html": "y" * 1_000_000}]
    async with ws_connect(client) as ws:
        await ws.send_json(question(messages=padding + question()["messages"]))
        frames = await receive_answer(ws)
    assert frames[-1]["content"] == "DONE"


async def test_frame_over_the_size_limit_closes_with_1009(client: TestClient) -> None:
    async with ws_connect(client) as ws:
        await ws.send_str("x" * (1048576 + 10))
        msg = await ws.receive()
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 1009


async def test_a_model_not_offered_is_refused_with_an_error_frame_naming_it(client: TestClient,
                                                                           fake: FakeOpenAI) -> None:
    async with ws_connect(client) as ws:
        await ws.send_json(question(model="gpt-4-very-expensive"))
        frames = await receive_answer(ws)
    text = texts.MODEL_NOT_FOUND.format(model="gpt-4-very-expensive")
    assert "gpt-4-very-expensive" in text
    assert frames == [{"conversationId": "c-1", "role": "assistant", "content": text, "html": to_html(text),
                       "createTime": frames[0]["createTime"], "isDone": True, "isSuccess": False}]
    assert fake.chat_requests() == []


@pytest.mark.parametrize("model", [None, "", "  "], ids=["absent", "empty", "blank"])
async def test_a_blank_or_absent_model_is_the_default(client: TestClient, fake: FakeOpenAI, model: Any) -> None:
    frame = question() if model is None else question(model=model)
    async with ws_connect(client) as ws:
        await ws.send_json(frame)
        assert (await receive_answer(ws))[-1]["content"] == "DONE"
    assert fake.chat_requests()[0].body["model"] == "gpt-3.5-turbo"


async def test_an_allowed_model_and_any_model_on_the_users_own_key_are_asked_for(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"models": ["gpt-3.5-turbo", "gpt-4o-mini"]})
    async with ws_connect(client) as ws:
        await ws.send_json(question(model="gpt-4o-mini"))
        await receive_answer(ws)
        await ws.send_json(question(model="my-own-fine-tune", authValue=f"Bearer {USER_KEY}", isDemo=False))
        await receive_answer(ws)
    assert [r.body["model"] for r in fake.chat_requests()] == ["gpt-4o-mini", "my-own-fine-tune"]


@pytest.mark.parametrize("upstream_id", ["chatcmpl-fake-1", None], ids=["repeated", "omitted"])
async def test_every_answer_gets_its_own_server_id_even_when_the_upstream_repeats_or_omits_its_id(
        client: TestClient, fake: FakeOpenAI, upstream_id: str | None) -> None:
    fake.default = Stream(answer_id=upstream_id)  # every answer carries the same id, or none at all
    ids = []
    async with ws_connect(client) as ws:
        for _ in range(3):
            await ws.send_json(question())
            frames = await receive_answer(ws)
            assert frames[-1]["content"] == "DONE"
            answer_ids = {f["id"] for f in frames[:-1]}
            assert len(answer_ids) == 1 and "id" not in frames[-1]
            ids.append(answer_ids.pop())
    async with ws_connect(client) as ws:  # a new socket: still never an id seen before
        await ws.send_json(question())
        ids.append((await receive_answer(ws))[0]["id"])
    assert len(set(ids)) == 4
    assert all(isinstance(i, str) and i and i != "chatcmpl-fake-1" for i in ids)


async def test_offline_provider_answers_without_a_key(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"api_keys": []})
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    assert frames[-2]["content"] == texts.OFFLINE_ANSWER and frames[-1]["content"] == "DONE"
    assert len(frames) > 3  # streamed token by token
    assert fake.requests == []


async def test_frames_are_coalesced_to_the_interval_but_the_first_is_immediate(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(ws={"frame_interval_ms": 200})
    fake.script.append(Stream(pieces=[str(n) for n in range(20)], delay=0.01))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    pieces = frames[:-1]
    assert pieces[0]["content"] == "0"
    assert pieces[-1]["content"] == "".join(str(n) for n in range(20))
    assert len(pieces) < 6  # ~0.2 s of pieces at one frame per 200 ms


async def test_while_the_interval_runs_the_end_frame_and_a_pong_go_at_once(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    # After a text frame the writer sleeps out the interval: the answer's newer text waits for it anyway.
    # What may go at once must still wake it: here the end frame (the whole answer came in one read), and
    # a pong asked for while a slow answer's next piece is pending.
    client = await make_client(ws={"frame_interval_ms": 800})
    loop = asyncio.get_running_loop()
    fake.script.append(Stream(pieces=["Hello", " world"]))
    fake.script.append(Stream(pieces=["slow", " answer"], delay=0.3))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        text = await ws.receive_json(timeout=5)
        sent = loop.time()
        done = await ws.receive_json(timeout=5)
        assert (text["content"], done["content"]) == ("Hello world", "DONE")
        assert loop.time() - sent < 0.4
        await ws.send_json(question())
        assert (await ws.receive_json(timeout=5))["content"] == "slow"
        await ws.send_json({"heart": "ping"})
        asked = loop.time()
        assert (await ws.receive_json(timeout=5))["heart"] == "pong"
        assert loop.time() - asked < 0.4
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == ["slow answer", "DONE"]


def _writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "FrameWriter._drain"]


async def test_an_answer_paced_slower_than_its_frames_shares_one_writer_task_which_ends_with_the_answer(
        client: TestClient, fake: FakeOpenAI) -> None:
    # Pieces 80 ms apart: each frame leaves the queue empty before the next piece comes. The writer's task
    # waits for the next frame of the answer instead of ending (one task per frame would cost a task
    # every 50 ms), and ends once the end frame is out: an open, idle socket keeps no task.
    fake.script.append(Stream(pieces=[f"p{n} " for n in range(6)], delay=0.08))
    seen: set[asyncio.Task[Any]] = set()
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames: list[dict[str, Any]] = []
        while not frames or not frames[-1]["isDone"]:
            frames.append(await ws.receive_json(timeout=5))
            seen.update(_writer_tasks())
        assert [f["content"] for f in frames[:-1]] == ["".join(f"p{n} " for n in range(k)) for k in range(1, 7)]
        assert len(seen) == 1
        await asyncio.sleep(0.05)
        assert _writer_tasks() == []
