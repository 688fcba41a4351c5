"""Sensitive words on the real app (PROTOCOL.md E.5): prompts with a listed word refused and not counted;
answers masked in everything a client receives, even when the upstream splits a word across chunks, on the
websocket, streamed and whole `/v1`, and `/chat`; refuse mode; the admin reload; a bad file at start."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.domain import texts
from chatgpt.faces.markdown import to_html
from tests.conftest import MakeClient, ws_connect
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.frames import question, receive_answer
from tests.test_startup import one_line, run_app

ADMIN_TOKEN = "adm-secret-123-words"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WORDS = "敏感词\nBadWord\n\n  坏蛋  \n"
# Each piece a chunk of its own, 50 ms apart: the word 敏感词 arrives split over two chunks, "badword"
# over three (in full-width capitals first), so no single delta holds a word.
SPLIT = ["这是敏", "感词, 还有 ＢＡ", "Dwo", "rd 和*星号*。"]
MASKED = "这是***, 还有 ******* 和*星号*。"


@pytest.fixture
def words_file(tmp_path: Path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text(WORDS, encoding="utf-8")
    return path


async def start(make_client: MakeClient, words_file: Path, action: str = "mask", **more: Any) -> TestClient:  # type: ignore[type-arg]
    return await make_client(moderation={"words_file": str(words_file), "action": action},
                             admin={"token": ADMIN_TOKEN}, limits={"http_per_second": 1000}, **more)


async def ask(client: TestClient, prompt: str = "你好") -> list[dict[str, Any]]:  # type: ignore[type-arg]
    async with ws_connect(client) as ws:
        await ws.send_json(question(prompt))
        return await receive_answer(ws)


async def remaining(client: TestClient) -> int:  # type: ignore[type-arg]
    return int((await ask(client, texts.QUOTA_QUERY))[0]["content"])


def sse_contents(body: str) -> list[str]:
    """The content of each `/v1` chunk that has some, in order."""
    out = []
    for line in body.split("\n\n"):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if content:
                out.append(content)
    return out


# --- prompts ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["这里有敏感词吗", "a ｂａｄｗｏｒｄ here", "BADWORD"])
async def test_a_websocket_prompt_with_a_listed_word_is_refused_and_not_counted(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI, prompt: str) -> None:
    client = await start(make_client, words_file)
    frames = await ask(client, prompt)
    assert len(frames) == 1
    assert {k: frames[0][k] for k in ("content", "html", "isDone", "isSuccess")} == {
        "content": texts.CONTENT_SENSITIVE, "html": to_html(texts.CONTENT_SENSITIVE), "isDone": True,
        "isSuccess": False}
    assert fake.chat_requests() == []
    assert await remaining(client) == 20


async def test_only_the_newest_prompt_is_checked(make_client: MakeClient, words_file: Path) -> None:
    # A refused prompt stays on the mini-program's screen, so in the context of the next question.
    client = await start(make_client, words_file)
    frame = question("换个问题")
    frame["messages"] = [{"role": "user", "content": "敏感词"}, {"role": "assistant", "content": "内容包含敏感词"},
                         *frame["messages"]]
    async with ws_connect(client) as ws:
        await ws.send_json(frame)
        frames = await receive_answer(ws)
    assert frames[-1]["content"] == "DONE"


async def test_an_image_prompt_with_a_listed_word_is_refused(make_client: MakeClient, words_file: Path) -> None:
    client = await start(make_client, words_file)
    async with ws_connect(client) as ws:
        await ws.send_json(question("", content="画一个坏蛋", isGenImg=True, messages=[]))
        frames = await receive_answer(ws)
    assert [f["content"] for f in frames] == [texts.CONTENT_SENSITIVE]


async def test_http_prompts_with_a_listed_word_are_400_and_not_counted(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    for stream in (False, True):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "说说敏感词"}]}], "stream": stream})
        assert response.status == 400
        error = (await response.json())["error"]
        assert (error["code"], error["type"]) == ("content_filter", "invalid_request_error")
    response = await client.post("/chat", json={"content": "BadWord!"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "content_filter"
    assert fake.chat_requests() == []
    assert await remaining(client) == 20


# --- answers, mask ---------------------------------------------------------------------------------------------

async def test_the_websocket_masks_a_word_split_across_chunks_in_the_text_and_the_html(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    frames = await ask(client)
    texts_sent = [f["content"] for f in frames[:-1]]
    assert texts_sent == ["这是敏", "这是***, 还有 ＢＡ", "这是***, 还有 ＢＡDwo", MASKED]
    assert frames[-1]["content"] == "DONE"
    last = frames[-2]
    # The masks are plain stars in the HTML too, never emphasis; the answer's own *星号* still is.
    assert last["html"] == "<p>这是***, 还有 ******* 和<em>星号</em>。</p>\n"
    assert "敏感词" not in json.dumps(frames, ensure_ascii=False)


async def test_masks_next_to_each_other_never_become_emphasis(make_client: MakeClient, words_file: Path,
                                                              fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=["一个坏", "蛋和坏蛋"], delay=0.05))
    frames = await ask(client)
    assert (frames[-2]["content"], frames[-2]["html"]) == ("一个**和**", "<p>一个**和**</p>\n")


async def test_masks_in_code_and_links_are_plain_stars(make_client: MakeClient, words_file: Path,
                                                       fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=["`坏蛋` [坏蛋](http://x/坏蛋) ```\n坏蛋\n```"]))
    frames = await ask(client)
    html = frames[-2]["html"]
    assert "坏蛋" not in html and "\ue000" not in html and "%EE%80%80" not in html
    assert "<code>**</code>" in html and 'href="http://x/**"' in html


async def test_streamed_v1_holds_back_only_a_tail_that_could_become_a_word(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    body = await response.text()
    assert response.status == 200
    # "敏" waits for the next chunk; "ＢＡ", then "ＢＡDwo", wait for the rest of "badword".
    assert sse_contents(body) == ["这是", "***, 还有 ", "******* 和*星号*。"]
    assert "敏感词" not in body and body.endswith("data: [DONE]\n\n")


async def test_streamed_v1_sends_a_held_tail_that_never_became_a_word_at_the_end(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=["结尾是敏", "感"], delay=0.05))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert sse_contents(await response.text()) == ["结尾是", "敏感"]


async def test_streamed_v1_relays_the_upstream_verbatim_when_no_word_is_listed(
        make_client: MakeClient, tmp_path: Path, fake: FakeOpenAI) -> None:
    empty = tmp_path / "none.txt"
    empty.write_text("\n", encoding="utf-8")
    client = await start(make_client, empty)
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    body = await response.text()
    assert sse_contents(body) == SPLIT
    assert '"id": "chatcmpl-fake-1"' in body  # the upstream's own chunks, as it wrote them


async def test_a_whole_v1_answer_is_masked(make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert (await response.json())["choices"][0]["message"]["content"] == MASKED


@pytest.mark.parametrize("sse", [False, True])
async def test_chat_masks_a_split_word_and_remembers_the_masked_answer(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI, sse: bool) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    headers = {"Accept": "text/event-stream"} if sse else {}
    response = await client.post("/chat", json={"content": "hi"}, headers=headers)
    body = await response.text()
    if sse:
        pieces = [json.loads(e[6:])["content"] for e in body.split("\n\n") if e.startswith("data: {\"content\"")]
        assert pieces == ["这是", "***, 还有 ", "******* 和*星号*。"]
    else:
        assert body == MASKED + "\n"
    assert "敏感词" not in body
    # The next turn sends the answer as the client saw it.
    await client.post("/chat", json={"content": "again", "conversationId": response.headers["X-Conversation-Id"]})
    assert fake.chat_requests()[-1].body["messages"][-2] == {"role": "assistant", "content": MASKED}


# --- answers, refuse -------------------------------------------------------------------------------------------

async def test_refuse_mode_ends_the_websocket_answer_when_a_word_completes_and_charges_it(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file, "refuse")
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    frames = await ask(client)
    assert [f["content"] for f in frames] == ["这是敏", texts.CONTENT_BLOCKED]
    assert (frames[-1]["isDone"], frames[-1]["isSuccess"]) == (True, False)
    await fake.disconnected.wait()  # the upstream request is closed at once
    assert await remaining(client) == 19  # it went upstream: charged


async def test_refuse_mode_on_streamed_http_ends_with_an_error_event(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file, "refuse")
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    body = await response.text()
    assert response.status == 200
    assert sse_contents(body) == ["这是敏"]
    error = json.loads(body.split("\n\n")[-2][6:])["error"]
    assert error["code"] == "content_filter"
    fake.script.append(Stream(pieces=SPLIT, delay=0.05))
    response = await client.post("/chat", json={"content": "hi"})
    assert (await response.text()).startswith("这是敏\n[error] The answer was stopped")


async def test_refuse_mode_with_a_word_in_the_first_chunk_is_400_before_any_byte(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file, "refuse")
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
                       ("/chat", {"content": "hi"})):
        fake.script.append(Stream(pieces=["你这个坏蛋"]))
        response = await client.post(path, json=body)
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "content_filter"


# --- the list: reload and start --------------------------------------------------------------------------------

async def test_the_admin_api_reloads_the_list_and_keeps_it_when_the_file_is_bad(
        make_client: MakeClient, words_file: Path) -> None:
    client = await start(make_client, words_file)
    assert (await ask(client, "新词"))[-1]["content"] == "DONE"
    words_file.write_text(WORDS + "新词\n", encoding="utf-8")
    response = await client.post("/admin/words/reload", headers=ADMIN)
    assert (response.status, await response.json()) == (200, {"words": 4})
    assert (await ask(client, "新词"))[-1]["content"] == texts.CONTENT_SENSITIVE
    words_file.write_bytes(b"\xff\xfe\xfa not utf-8")
    response = await client.post("/admin/words/reload", headers=ADMIN)
    assert response.status == 400
    message = (await response.json())["error"]["message"]
    assert "not UTF-8" in message and "the 4 words in use stay" in message
    assert (await ask(client, "新词"))[-1]["content"] == texts.CONTENT_SENSITIVE
    words_file.unlink()
    response = await client.post("/admin/words/reload", headers=ADMIN)
    assert response.status == 400 and "cannot read" in (await response.json())["error"]["message"]
    assert (await client.post("/admin/words/reload")).status == 401


async def test_reload_without_a_words_file_is_400(make_client: MakeClient) -> None:
    client = await make_client(admin={"token": ADMIN_TOKEN})
    response = await client.post("/admin/words/reload", headers=ADMIN)
    assert response.status == 400 and "moderation.words_file" in (await response.json())["error"]["message"]


@pytest.mark.parametrize(("content", "why"), [(None, "cannot read"), (b"ok\n\xff\xfe\n", "not UTF-8")])
def test_a_words_file_that_cannot_be_read_stops_the_start_with_one_line(
        tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_bytes(content)
    line = one_line(run_app(tmp_path, {"moderation": {"words_file": str(path)},
                                       "state": {"file": str(tmp_path / "state.json")}}))
    assert line.startswith(f"chatgpt-api: setting moderation.words_file: words file {path}: {why}")


def test_check_says_how_many_words_are_listed(tmp_path: Path, words_file: Path) -> None:
    result = run_app(tmp_path, {"moderation": {"words_file": str(words_file), "action": "refuse"}}, "--check")
    assert result.returncode == 0, result.stderr
    assert "moderation: 3 listed words, action refuse" in result.stdout


# --- reasoning and the rest of what /v1 sends ----------------------------------------------------------------

THOUGHT = ["先想想敏", "感词怎么", "办"]  # the reasoning, with a word split across two chunks


async def test_the_websocket_masks_the_reasoning_it_quotes(make_client: MakeClient, words_file: Path,
                                                           fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(reasoning=THOUGHT, pieces=["好的"], delay=0.05))
    frames = await ask(client)
    assert [f["content"] for f in frames] == [
        "> 思考中…\n> 先想想敏", "> 思考中…\n> 先想想***怎么", "> 思考中…\n> 先想想***怎么办", "好的", "DONE"]
    assert "<p>思考中…<br />\n先想想***怎么办</p>" in frames[2]["html"]


async def test_streamed_v1_masks_the_reasoning_and_the_answer_and_keeps_the_rest_of_each_chunk(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(reasoning=THOUGHT, reasoning_field="reasoning", pieces=SPLIT, delay=0.05))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "logprobs": True,
        "stream_options": {"include_usage": True}})
    body = await response.text()
    chunks = [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]
    thought = [c["choices"][0]["delta"].get("reasoning") for c in chunks if c["choices"]]
    assert [t for t in thought if t] == ["先想想", "***怎么", "办"]
    assert sse_contents(body) == ["这是", "***, 还有 ", "******* 和*星号*。"]
    assert all(c["id"] == "chatcmpl-fake-1" for c in chunks)  # the upstream's own chunks, re-encoded
    # Logprobs spell the text token by token: none is left with a token in it.
    assert not [c for c in chunks if c["choices"] and (c["choices"][0].get("logprobs") or {}).get("content")]
    assert chunks[-1]["usage"]["total_tokens"] == 21
    assert "敏感词" not in body and "ＢＡ" not in body.split("******")[-1]


async def test_a_whole_v1_answer_masks_its_reasoning_and_leaves_out_logprobs(
        make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(reasoning=THOUGHT, pieces=SPLIT))
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    choice = (await response.json())["choices"][0]
    assert choice["message"]["reasoning_content"] == "先想想***怎么办"
    assert choice["message"]["content"] == MASKED
    assert choice["logprobs"] is None


async def test_chat_masks_its_reasoning_events(make_client: MakeClient, words_file: Path, fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file)
    fake.script.append(Stream(reasoning=THOUGHT, pieces=["好的"], delay=0.05))
    response = await client.post("/chat", json={"content": "hi"}, headers={"Accept": "text/event-stream"})
    body = await response.text()
    thought = [json.loads(e.split("data: ", 1)[1])["content"] for e in body.split("\n\n")
               if e.startswith("event: reasoning")]
    assert thought == ["先想想", "***怎么", "办"]


async def test_refuse_mode_stops_a_word_in_the_reasoning(make_client: MakeClient, words_file: Path,
                                                         fake: FakeOpenAI) -> None:
    client = await start(make_client, words_file, "refuse")
    fake.script.append(Stream(reasoning=THOUGHT, pieces=["好的"], delay=0.05))
    frames = await ask(client)
    assert [f["content"] for f in frames] == ["> 思考中…\n> 先想想敏", texts.CONTENT_BLOCKED]


async def test_answers_of_a_provider_without_chunks_of_its_own_are_masked_too(
        make_client: MakeClient, tmp_path: Path) -> None:
    # The built-in offline provider streams its notice token by token, with no OpenAI chunks.
    path = tmp_path / "words.txt"
    path.write_text("offline mode\n", encoding="utf-8")
    client = await make_client(upstream={"api_keys": []}, moderation={"words_file": str(path)})
    expected = texts.OFFLINE_ANSWER.replace("Offline mode", "*" * 12)
    assert (await ask(client))[-2]["content"] == expected
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert "".join(sse_contents(await response.text())) == expected
    response = await client.post("/chat", json={"content": "hi"})
    assert await response.text() == expected + "\n"
