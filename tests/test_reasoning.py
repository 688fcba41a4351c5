"""Reasoning models (PROTOCOL.md E.2): the thinking as a quote on the websocket until the answer starts,
relayed as sent on /v1 (and whole in a non-streamed answer), its own SSE event on /chat."""
from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from chatgpt.faces.frames import thinking_quote
from chatgpt.faces.markdown import to_html
from tests.conftest import CLIENT_TOKEN, MakeClient, ws_connect
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer

THOUGHTS = ["The user greets me.", "\nI should", " greet back:\n\n- politely"]
ANSWER = ["Hello", "!"]


def deepseek(**fields: Any) -> Stream:
    """DeepSeek-like: `reasoning_content` deltas (content null), then the answer's."""
    return Stream(**{"pieces": ANSWER, "reasoning": THOUGHTS, "delay": 0.05, **fields})


def openrouter(**fields: Any) -> Stream:
    """OpenRouter-like: `delta.reasoning`, and a processing comment before anything."""
    return Stream(**{"pieces": ANSWER, "reasoning": THOUGHTS, "reasoning_field": "reasoning", "delay": 0.05,
                     "comments": ["OPENROUTER PROCESSING"], **fields})


@pytest.mark.parametrize("upstream", [deepseek, openrouter], ids=["reasoning_content", "reasoning"])
async def test_the_bubble_quotes_the_thinking_then_shows_the_answer_alone_under_one_id(
        client: TestClient, fake: FakeOpenAI, upstream: Any) -> None:
    fake.script.append(upstream())
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    *texts, end = frames
    thinking = [f["content"] for f in texts if f["content"].startswith("> ")]
    answer = [f["content"] for f in texts if not f["content"].startswith("> ")]
    # Thinking frames first (pieces 50 ms apart: one frame each), then the answer's, never mixed.
    assert [f["content"] for f in texts] == thinking + answer
    assert thinking == ["> 思考中…\n> The user greets me.",
                        "> 思考中…\n> The user greets me.\n> I should",
                        "> 思考中…\n> The user greets me.\n> I should greet back:\n> \n> - politely"]
    assert answer == ["Hello", "Hello!"]
    [answer_id] = {f["id"] for f in texts}  # one id, the server's (the upstream repeats its own)
    assert answer_id.startswith("chatcmpl-") and answer_id != "chatcmpl-fake-1"
    for frame in texts:
        assert frame["html"] == to_html(frame["content"])  # the thinking renders as a Markdown quote
        assert (frame["isDone"], frame["isSuccess"]) == (False, True)
    assert texts[0]["html"].startswith("<blockquote>")
    assert (end["content"], end["isDone"], end["isSuccess"]) == ("DONE", True, True)


async def test_with_reasoning_hidden_no_frame_comes_before_the_answer(make_client: MakeClient,
                                                                      fake: FakeOpenAI) -> None:
    client = await make_client(ws={"reasoning": "hide"})
    fake.script.append(deepseek())
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == ["Hello", "Hello!", "DONE"]


@pytest.mark.parametrize("reasoning", ["", "one line", "a\nb", "a\n\nb", "# title\n- item\n\n```py\nx = 1\n```\n",
                                       "> nested\n\n| a | b |\n|---|---|\n| 1 | 2 |", "  indented\n\n\n\nend"])
def test_the_quote_renders_the_same_html_built_around_the_unquoted_text(reasoning: str) -> None:
    # frames.py renders the quote incrementally as a blockquote around its unquoted lines.
    assert to_html(thinking_quote(reasoning)) == "<blockquote>\n" + to_html(f"思考中…\n{reasoning}") + "</blockquote>\n"


async def test_v1_relays_reasoning_deltas_as_the_upstream_sent_them(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(deepseek(delay=0.0))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=CLIENT_TOKEN, max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model="gpt-3.5-turbo", stream=True,
                                                   messages=[{"role": "user", "content": "Hi"}])
        chunks = [chunk async for chunk in stream]
    finally:
        await sdk.close()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "".join(THOUGHTS)
    assert "".join(d.content or "" for d in deltas) == "".join(ANSWER)


async def test_a_non_streamed_v1_answer_holds_the_whole_reasoning(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(deepseek())
    response = await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status == 200
    message = (await response.json())["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello!", "reasoning_content": "".join(THOUGHTS)}


async def test_chat_keeps_reasoning_out_of_the_plain_text(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(deepseek(delay=0.0))
    response = await client.post("/chat", json={"content": "Hi"})
    assert response.status == 200
    assert await response.text() == "Hello!\n"


async def test_chat_sends_reasoning_as_its_own_events_before_the_answer(client: TestClient,
                                                                        fake: FakeOpenAI) -> None:
    fake.script.append(openrouter(delay=0.0))
    response = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": "text/event-stream"})
    events = []
    for block in (await response.text()).strip("\n").split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event"), json.loads(lines["data"])))
    cid = response.headers["X-Conversation-Id"]
    assert events == [("conversation", {"conversationId": cid}),
                      *[("reasoning", {"content": t}) for t in THOUGHTS],
                      *[(None, {"content": a}) for a in ANSWER],
                      ("done", {"conversationId": cid})]
