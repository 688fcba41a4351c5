"""`POST /chat` (PROTOCOL.md B.2): the conversation memory on its own, then curl's view of the real app."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from app import create_app
from chatgpt.domain import texts
from chatgpt.domain.memory import ConversationMemory, owner_of
from chatgpt.domain.question import Payer
from chatgpt.server.local_store import LocalConversations, LocalStore
from tests.conftest import CLIENT_TOKEN, SERVER_KEY, USER_KEY, MakeClient, build_settings
from tests.fakes.clock import FakeClock
from tests.fakes.openai import Fail, FakeOpenAI, Stream

FAKE_TEXT = "Hello, **world**!"  # the fake upstream's default pieces, joined
FRESH_ID = re.compile(r"^[0-9a-f]{32}$")
ERROR_KEYS = {"message", "type", "param", "code"}
FAST = {"http_per_second": 100}  # tests that send many requests must not meet the per-IP HTTP limiter


def turn(question: str, answer: str) -> list[dict[str, str]]:
    """One remembered turn as the OpenAI messages it becomes."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


OWNER = "203.0.113.7 anonymous"  # who a conversation belongs to: identity and payer


def memory(clock: FakeClock, *, conversations: int = 10, turns: int = 10, ttl: float = 3600.0,
           chars: int = 12000) -> ConversationMemory:
    """A memory driven by `clock`, on an in-process store with the same clock (`kept(mem)`)."""
    return ConversationMemory(LocalStore(wall=clock), conversations, turns, ttl, max_chars=chars, clock=clock)


def kept(mem: ConversationMemory) -> LocalConversations:
    """The in-process store's records behind `mem` (what the state file keeps)."""
    assert isinstance(mem.store, LocalStore)
    return mem.store.conversations


# --- ConversationMemory without a server --------------------------------------------------------------------------

async def test_history_is_the_remembered_turns_as_openai_messages_oldest_first() -> None:
    mem = memory(FakeClock())
    await mem.remember("c-1", OWNER, "q1", "a1")
    await mem.remember("c-1", OWNER, "q2", "a2")
    assert await mem.history("c-1", OWNER) == turn("q1", "a1") + turn("q2", "a2")


async def test_an_unknown_conversation_has_no_history() -> None:
    mem = memory(FakeClock())
    await mem.remember("c-1", OWNER, "q1", "a1")
    assert await mem.history("c-2", OWNER) == []
    assert len(kept(mem)) == 1


def test_new_ids_are_fresh_32_hex_strings() -> None:
    ids = {ConversationMemory.new_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(FRESH_ID.match(cid) for cid in ids)


async def test_only_the_newest_max_turns_are_kept() -> None:
    mem = memory(FakeClock(), turns=2)
    for n in range(1, 5):
        await mem.remember("c-1", OWNER, f"q{n}", f"a{n}")
    assert await mem.history("c-1", OWNER) == turn("q3", "a3") + turn("q4", "a4")


async def test_past_max_conversations_the_least_recently_used_is_forgotten() -> None:
    clock = FakeClock()
    mem = memory(clock, conversations=2)
    await mem.remember("a", OWNER, "qa", "aa")
    clock.now += 1
    await mem.remember("b", OWNER, "qb", "ab")
    clock.now += 1
    await mem.remember("a", OWNER, "qa2", "aa2")  # "a" is used again: "b" is now the least recently used
    clock.now += 1
    await mem.remember("c", OWNER, "qc", "ac")
    assert len(kept(mem)) == 2
    assert await mem.history("b", OWNER) == []
    assert await mem.history("a", OWNER) == turn("qa", "aa") + turn("qa2", "aa2")
    assert await mem.history("c", OWNER) == turn("qc", "ac")


async def test_a_conversation_unused_for_the_ttl_is_forgotten() -> None:
    clock = FakeClock()
    mem = memory(clock, ttl=60)
    await mem.remember("old", OWNER, "q", "a")
    clock.now += 30
    await mem.remember("new", OWNER, "q", "a")
    clock.now += 29.9  # "old" unused for 59.9 s
    assert await mem.history("old", OWNER) == turn("q", "a")
    clock.now += 0.2  # "old" unused for 60.1 s, "new" for 30.1 s
    assert await mem.history("old", OWNER) == []
    assert await mem.history("new", OWNER) == turn("q", "a")
    await mem.remember("other", OWNER, "q", "a")  # the store drops what has expired as it saves
    assert len(kept(mem)) == 2


async def test_remembering_again_restarts_the_ttl() -> None:
    clock = FakeClock()
    mem = memory(clock, ttl=60)
    await mem.remember("c-1", OWNER, "q1", "a1")
    clock.now += 50
    await mem.remember("c-1", OWNER, "q2", "a2")
    clock.now += 50  # 100 s after the first turn, 50 s after the last
    assert await mem.history("c-1", OWNER) == turn("q1", "a1") + turn("q2", "a2")


async def test_snapshot_and_restore_round_trip_through_json() -> None:
    clock = FakeClock()
    saved = memory(clock)
    await saved.remember("c-1", OWNER, "q1", "a1")
    clock.now += 1
    await saved.remember("c-2", OWNER, "问题", "回答")
    await saved.remember("c-1", OWNER, "q2", "a2")
    snapshot = json.loads(json.dumps(kept(saved).snapshot()))
    assert snapshot == {"c-2": {"owner": OWNER, "used": 1001.0, "turns": [["问题", "回答"]]},
                        "c-1": {"owner": OWNER, "used": 1001.0, "turns": [["q1", "a1"], ["q2", "a2"]]}}
    restored = memory(clock)
    kept(restored).restore(snapshot)
    assert await restored.history("c-1", OWNER) == turn("q1", "a1") + turn("q2", "a2")
    assert await restored.history("c-2", OWNER) == turn("问题", "回答")
    assert json.loads(json.dumps(kept(restored).snapshot())) == snapshot


@pytest.mark.parametrize("garbage", [None, 42, "text", [["c-1", "q", "a"]], {"c-1": "turns"}, {"c-1": []},
                                     {"c-1": {"turns": "q/a", "owner": OWNER, "used": 1000}},
                                     {"c-1": {"turns": [["q", "a"]]}},
                                     {"c-1": {"turns": [["q", "a"]], "used": "1000"}},
                                     {"c-1": {"turns": [["q", "a"]], "used": True}}])
async def test_garbage_restored_never_opens_a_conversation(garbage: Any) -> None:
    mem = memory(FakeClock())
    kept(mem).restore(garbage)
    assert await mem.open("c-1", OWNER) != ("c-1", turn("q", "a"))
    assert await mem.history("c-1", OWNER) == []


async def test_malformed_turns_are_skipped_and_the_good_ones_kept_on_restore() -> None:
    mem = memory(FakeClock())
    kept(mem).restore({"c-1": {"owner": OWNER, "used": 1000, "turns": [
        ["q1", "a1"], ["q"], ["q", "a", "x"], [1, "a"], ["q", None], "q/a", {"q": "a"}, ["q2", "a2"]]}})
    assert await mem.history("c-1", OWNER) == turn("q1", "a1") + turn("q2", "a2")


@pytest.mark.parametrize("bad_id", ["", "has space", "slash/id", "x" * 101, "ü-umlaut", "new\nline"])
def test_conversation_ids_are_validated_on_restore(bad_id: str) -> None:
    mem = memory(FakeClock())
    good = {"owner": OWNER, "used": 1000, "turns": [["q", "a"]]}
    kept(mem).restore({bad_id: good, "ok_1.a:b-c": good})
    assert list(kept(mem).snapshot()) == ["ok_1.a:b-c"]


async def test_restored_conversations_keep_the_bounds_and_drop_what_has_expired() -> None:
    clock = FakeClock(10_000.0)
    mem = memory(clock, conversations=2, turns=1, ttl=60)
    kept(mem).restore({
        "expired": {"owner": OWNER, "used": 9_000, "turns": [["q", "a"]]},
        "older": {"owner": OWNER, "used": 9_970, "turns": [["q", "a"]]},
        "newer": {"owner": OWNER, "used": 9_980, "turns": [["q1", "a1"], ["q2", "a2"]]},
        "newest": {"owner": OWNER, "used": 9_990, "turns": [["q", "a"]]},
    })
    assert await mem.history("expired", OWNER) == []
    assert await mem.history("newer", OWNER) == turn("q2", "a2")
    await mem.remember("newest", OWNER, "q", "a")  # the first save applies the count bound
    assert list(kept(mem).snapshot()) == ["newer", "newest"]


async def test_a_conversation_is_only_opened_by_its_owner_others_get_a_new_id() -> None:
    mem = memory(FakeClock())
    await mem.remember("c-1", OWNER, "q1", "a1")
    assert await mem.open("c-1", OWNER) == ("c-1", turn("q1", "a1"))
    for stranger in ("198.51.100.1 anonymous", "203.0.113.7 trusted", "203.0.113.7 own:0123456789abcdef"):
        cid, history = await mem.open("c-1", stranger)
        assert FRESH_ID.match(cid) and history == []
        assert await mem.history("c-1", stranger) == []
        await mem.remember("c-1", stranger, "hijack", "no")  # cannot be written into either
    assert await mem.history("c-1", OWNER) == turn("q1", "a1")


async def test_unknown_or_missing_ids_open_a_new_conversation_under_a_new_id() -> None:
    mem = memory(FakeClock())
    first, second = await mem.open(None, OWNER), await mem.open("never-issued", OWNER)
    assert first[1] == second[1] == []
    assert FRESH_ID.match(first[0]) and FRESH_ID.match(second[0]) and first[0] != second[0] != "never-issued"


def test_the_owner_is_identity_and_payer_and_an_own_key_is_only_a_hash() -> None:
    anonymous = owner_of("203.0.113.7", Payer("anonymous"))
    assert anonymous == "203.0.113.7 anonymous"
    assert owner_of("203.0.113.7", Payer("trusted")) != anonymous
    own = owner_of("203.0.113.7", Payer("own", USER_KEY))
    assert USER_KEY not in own and USER_KEY[-4:] not in own
    assert own == owner_of("203.0.113.7", Payer("own", USER_KEY)) != owner_of("203.0.113.7", Payer("own", "sk-other"))
    assert owner_of("198.51.100.1", Payer("anonymous")) != anonymous


async def test_a_conversation_keeps_at_most_max_chars_the_oldest_turns_dropped() -> None:
    mem = memory(FakeClock(), turns=100, chars=25)
    await mem.remember("c", OWNER, "a" * 10, "b" * 10)  # 20
    await mem.remember("c", OWNER, "c" * 5, "d" * 5)  # 30 in all: the first turn goes
    assert await mem.history("c", OWNER) == turn("c" * 5, "d" * 5)
    await mem.remember("c", OWNER, "e" * 20, "f" * 10)  # alone over the budget: nothing of it can be kept
    assert await mem.history("c", OWNER) == []
    assert (await mem.open("c", OWNER))[0] == "c"  # the conversation (and its owner) stays


async def test_restored_conversations_are_bounded_by_chars_and_ownerless_ones_never_open() -> None:
    mem = memory(FakeClock(), turns=100, chars=25)
    kept(mem).restore({"kept": {"owner": OWNER, "used": 1000, "turns": [["a" * 10, "b" * 10], ["c" * 5, "d" * 5]]},
                       "ownerless": {"used": 1000, "turns": [["q", "a"]]}})
    assert await mem.history("kept", OWNER) == turn("c" * 5, "d" * 5)
    for owner in (OWNER, "", "None"):
        assert (await mem.open("ownerless", owner))[0] != "ownerless"


# --- POST /chat through the app -----------------------------------------------------------------------------------

async def post_chat(client: TestClient, content: Any = "Hi", cid: str | None = None,
                    headers: dict[str, str] | None = None) -> ClientResponse:
    """`curl -d '{"content": ..., "conversationId": ...}' /chat`."""
    body: dict[str, Any] = {"content": content}
    if cid is not None:
        body["conversationId"] = cid
    return await client.post("/chat", json=body, headers=headers or {})


def sse_events(raw: str) -> list[tuple[str | None, Any]]:
    """`(event name or None, parsed data)` for each event of an SSE body."""
    assert raw.endswith("\n\n"), raw[-80:]
    events: list[tuple[str | None, Any]] = []
    for block in raw[:-2].split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            assert field in ("event", "data"), block
            if field == "event":
                name = value
            else:
                data = json.loads(value)
        events.append((name, data))
    return events


async def openai_error(response: ClientResponse, status: int) -> dict[str, Any]:
    """An OpenAI-style error answer with the real HTTP status; its `error` object."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


async def test_plain_text_answer_is_the_upstream_text_with_a_fresh_conversation_id(
        client: TestClient, fake: FakeOpenAI) -> None:
    response = await post_chat(client, "Hi")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    assert FRESH_ID.match(response.headers["X-Conversation-Id"])
    assert await response.text() == FAKE_TEXT + "\n"
    assert fake.chat_requests()[0].body["messages"] == [{"role": "user", "content": "Hi"}]
    assert fake.chat_requests()[0].authorization == f"Bearer {SERVER_KEY}"


async def test_each_request_without_an_id_starts_a_new_conversation(client: TestClient, fake: FakeOpenAI) -> None:
    first = await post_chat(client, "one")
    second = await post_chat(client, "two")
    assert first.headers["X-Conversation-Id"] != second.headers["X-Conversation-Id"]
    assert fake.chat_requests()[1].body["messages"] == [{"role": "user", "content": "two"}]


async def test_a_second_turn_sends_the_first_question_and_answer_upstream(client: TestClient,
                                                                          fake: FakeOpenAI) -> None:
    fake.script.extend([Stream(pieces=["Four", "."]), Stream(pieces=["Five."])])
    first = await post_chat(client, "What is 2+2?")
    cid = first.headers["X-Conversation-Id"]
    assert await first.text() == "Four.\n"
    second = await post_chat(client, "And 2+3?", cid)
    assert second.headers["X-Conversation-Id"] == cid
    assert await second.text() == "Five.\n"
    assert fake.chat_requests()[1].body["messages"] == [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 2+3?"}]


async def test_a_client_chosen_conversation_id_is_not_taken_a_new_id_is_issued(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(limits=FAST)
    first = await post_chat(client, "first", "my-chat.1")
    cid = first.headers["X-Conversation-Id"]
    assert FRESH_ID.match(cid)
    await first.read()
    other = await post_chat(client, "elsewhere", "my-chat.1")  # the id it chose is still nobody's
    assert other.headers["X-Conversation-Id"] not in (cid, "my-chat.1")
    await other.read()
    await (await post_chat(client, "second", cid)).read()
    bodies = [r.body["messages"] for r in fake.chat_requests()]
    assert bodies[1] == [{"role": "user", "content": "elsewhere"}]
    assert bodies[2] == turn("first", FAKE_TEXT) + [{"role": "user", "content": "second"}]


async def test_another_address_sending_a_conversation_id_gets_a_new_conversation_not_the_turns(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(limits=FAST)
    owner = {"X-Real-IP": "203.0.113.7"}  # through the trusted loopback proxy
    first = await post_chat(client, "my secret is 42", headers=owner)
    cid = first.headers["X-Conversation-Id"]
    await first.read()
    stolen = await post_chat(client, "what is my secret?", cid, headers={"X-Real-IP": "198.51.100.66"})
    assert stolen.headers["X-Conversation-Id"] != cid
    await stolen.read()
    # The same address paying otherwise (its own key) is another caller too.
    own = await post_chat(client, "and now?", cid, headers={**owner, "Authorization": f"Bearer {USER_KEY}"})
    assert own.headers["X-Conversation-Id"] != cid
    await own.read()
    mine = await post_chat(client, "still there?", cid, headers=owner)
    assert mine.headers["X-Conversation-Id"] == cid
    await mine.read()
    bodies = [r.body["messages"] for r in fake.chat_requests()]
    assert bodies[1] == [{"role": "user", "content": "what is my secret?"}]
    assert bodies[2] == [{"role": "user", "content": "and now?"}]
    assert bodies[3] == turn("my secret is 42", FAKE_TEXT) + [{"role": "user", "content": "still there?"}]


async def test_sse_starts_with_the_conversation_event_then_pieces_then_done(client: TestClient,
                                                                          fake: FakeOpenAI) -> None:
    fake.script.append(Stream(delay=0.02))  # pieces arriving together would be relayed as one event
    response = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": "text/event-stream"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["X-Accel-Buffering"] == "no"
    cid = response.headers["X-Conversation-Id"]
    assert FRESH_ID.match(cid)
    assert sse_events(await response.text()) == [
        ("conversation", {"conversationId": cid}),
        (None, {"content": "Hello"}), (None, {"content": ", "}), (None, {"content": "**world**"}),
        (None, {"content": "!"}),
        ("done", {"conversationId": cid}),
    ]


async def test_sse_names_the_issued_conversation_id_in_the_first_and_last_events(client: TestClient) -> None:
    first = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": "text/event-stream"})
    cid = first.headers["X-Conversation-Id"]
    assert sse_events(await first.text())[0] == ("conversation", {"conversationId": cid})
    response = await client.post("/chat", json={"content": "Hi", "conversationId": cid},
                                 headers={"Accept": "text/event-stream"})
    events = sse_events(await response.text())
    assert events[0] == ("conversation", {"conversationId": cid})
    assert events[-1] == ("done", {"conversationId": cid})
    unknown = await client.post("/chat", json={"content": "Hi", "conversationId": "c-42"},
                                headers={"Accept": "text/event-stream"})
    new = unknown.headers["X-Conversation-Id"]
    assert new != "c-42" and sse_events(await unknown.text())[0] == ("conversation", {"conversationId": new})


@pytest.mark.parametrize("raw", [b"", b"   ", b"not json", b"[1, 2]", b'"text"', b"null", b'{"content": "x"'])
async def test_an_empty_or_garbage_body_is_a_400_in_openai_shape(client: TestClient, fake: FakeOpenAI,
                                                                  raw: bytes) -> None:
    response = await client.post("/chat", data=raw, headers={"Content-Type": "application/json"})
    error = await openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert fake.chat_requests() == []


@pytest.mark.parametrize("body", [{}, {"content": ""}, {"content": "   "}, {"content": 5}, {"content": ["Hi"]},
                                  {"content": None}])
async def test_a_missing_or_blank_content_is_a_400(client: TestClient, fake: FakeOpenAI, body: dict[str, Any]) -> None:
    error = await openai_error(await client.post("/chat", json=body), 400)
    assert error["message"] == "'content' must be a non-empty string."
    assert fake.chat_requests() == []


@pytest.mark.parametrize("cid", ["", "has space", "x" * 101, "a/b", 42, ["c-1"], {"id": "c-1"}, True])
async def test_a_bad_conversation_id_is_a_400(client: TestClient, fake: FakeOpenAI, cid: Any) -> None:
    error = await openai_error(await client.post("/chat", json={"content": "Hi", "conversationId": cid}), 400)
    assert error["message"] == "'conversationId' must be 1-100 letters, digits or _.:-"
    assert fake.chat_requests() == []


async def test_upstream_500_before_any_text_is_a_502_and_nothing_is_remembered(client: TestClient,
                                                                               fake: FakeOpenAI) -> None:
    fake.script.append(Fail(500, "upstream is on fire"))
    error = await openai_error(await post_chat(client, "lost question", "c-fail"), 502)
    assert (error["message"], error["type"]) == ("upstream is on fire", "api_error")
    response = await post_chat(client, "retry", "c-fail")
    assert await response.text() == FAKE_TEXT + "\n"
    assert fake.chat_requests()[1].body["messages"] == [{"role": "user", "content": "retry"}]


async def test_a_stream_broken_mid_answer_ends_with_an_error_line_and_is_not_remembered(
        client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(pieces=["partial ", "answer"], done=False))
    response = await post_chat(client, "lost question", "c-broken")
    assert response.status == 200
    # English for curl users, saying what failed (PROTOCOL.md E.2)
    assert await response.text() == "partial answer\n[error] The upstream at 127.0.0.1 broke off its answer or sent something unreadable.\n"
    await (await post_chat(client, "retry", "c-broken")).read()
    assert fake.chat_requests()[1].body["messages"] == [{"role": "user", "content": "retry"}]
    assert len(fake.chat_requests()) == 2  # the broken stream was not re-POSTed


async def test_a_stream_broken_mid_answer_ends_with_an_sse_error_event(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(pieces=["partial ", "answer"], done=False, delay=0.02))
    response = await client.post("/chat", json={"content": "Hi"}, headers={"Accept": "text/event-stream"})
    assert sse_events(await response.text()) == [
        ("conversation", {"conversationId": response.headers["X-Conversation-Id"]}), (None, {"content": "partial "}), (None, {"content": "answer"}),
        ("error", {"message": "The upstream at 127.0.0.1 broke off its answer or sent something unreadable."})]


async def test_the_remembered_context_is_trimmed_to_the_budget_oldest_turns_first(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"context_chars": 25}, limits=FAST)
    fake.script.extend([Stream(pieces=["b" * 10]), Stream(pieces=["d" * 5]), Stream(pieces=["f"])])
    cid = None
    for content in ("a" * 10, "c" * 5, "e" * 8):
        response = await post_chat(client, content, cid)
        cid = response.headers["X-Conversation-Id"]
        await response.read()
    # 10 + 10 + 5 + 5 + 8 = 38 characters: the first turn (20) must go to fit 25.
    assert fake.chat_requests()[2].body["messages"] == turn("c" * 5, "d" * 5) + [{"role": "user", "content": "e" * 8}]


async def test_a_client_token_pays_with_the_server_key_without_the_daily_quota(make_client: MakeClient,
                                                                               fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 1})
    for _ in range(3):
        response = await post_chat(client, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        assert (response.status, await response.text()) == (200, FAKE_TEXT + "\n")
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {SERVER_KEY}"] * 3


async def test_without_a_bearer_the_anonymous_daily_quota_applies(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 1})
    first = await post_chat(client, "one")
    assert (first.status, await first.text()) == (200, FAKE_TEXT + "\n")
    error = await openai_error(await post_chat(client, "two", headers={"Authorization": "Bearer "}), 429)
    assert (error["message"], error["type"], error["code"]) == (
        "Today's free questions from your address are used up; they come back at midnight (or send your own API key as the bearer token).", "insufficient_quota", "daily_quota_exceeded")
    assert [r.authorization for r in fake.chat_requests()] == [f"Bearer {SERVER_KEY}"]


async def test_a_users_own_bearer_key_is_passed_upstream_unchanged(client: TestClient, fake: FakeOpenAI) -> None:
    response = await post_chat(client, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert await response.text() == FAKE_TEXT + "\n"
    assert fake.chat_requests()[0].authorization == f"Bearer {USER_KEY}"


async def started(settings: Any) -> TestClient:
    """The real app on a real socket, started explicitly (closing it runs the shutdown save)."""
    client = TestClient(TestServer(create_app(settings)))
    try:
        await client.start_server()
    except BaseException:
        await client.close()
        raise
    return client


async def test_memory_survives_a_restart_through_the_state_file(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.script.extend([Stream(pieces=["Paris."]), Stream(pieces=["About 2 million."])])
    first_run = await started(build_settings(tmp_path, fake, {}))
    try:
        response = await post_chat(first_run, "Capital of France?")
        cid = response.headers["X-Conversation-Id"]
        assert await response.text() == "Paris.\n"
    finally:
        await first_run.close()
    saved = json.loads((tmp_path / "state.json").read_text(encoding="utf-8"))
    assert saved["chat"][cid]["turns"] == [["Capital of France?", "Paris."]]
    second_run = await started(build_settings(tmp_path, fake, {}))
    try:
        response = await post_chat(second_run, "Population?", cid)
        assert await response.text() == "About 2 million.\n"
    finally:
        await second_run.close()
    assert fake.chat_requests()[1].body["messages"] == turn("Capital of France?", "Paris.") + [
        {"role": "user", "content": "Population?"}]
