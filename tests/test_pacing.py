"""What a long websocket answer costs its user: frames spaced by the interval and a byte budget per
answer (faces/pacing.py), so the bytes grow linearly with the answer's duration, not with its square."""
from __future__ import annotations

import math
import time
from typing import Any

import pytest
from aiohttp import WSMsgType
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgpt import jsontext
from chatgpt.faces.frames import text_frame
from chatgpt.faces.markdown import IncrementalRenderer
from chatgpt.faces.pacing import TextPace
from chatgpt.settings import Settings
from tests.conftest import MakeClient, ws_connect
from tests.fakes.openai import FakeOpenAI, Stream
from tests.helpers.frames import question

# The capacity benchmark's tokens (bench/stamps.py): Markdown and Chinese, each with a six-digit
# timestamp, ~10 characters a token.
WORDS = (
    "Here", " is", " a", " **short**", " answer", " to", " the", " question.", " It", " has",
    " a", " few", " parts:", "\n\n- one", " point", "\n- two", " of", " them", "\n\n你好", "，世界。",
    " Some", " `code`", " in", " a", " line,", " and", " a", " block:", "\n\n```python\n", "print(\"hi\")",
    "\n```\n\n", "So", " it", " is", " done", " now.", " We", " go", " on", "\n\n",
)


def token(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]}{i * 33 % 1000000:06d}"


class AnswerFrames:
    """The bytes of the real text frame after `k` tokens of one answer, for growing `k` (rendered
    incrementally, as the writer renders them)."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens = 0
        self.renderer = IncrementalRenderer()

    def size(self, k: int) -> int:
        assert k >= self.tokens
        while self.tokens < k:
            self.text += token(self.tokens)
            self.tokens += 1
        html = self.renderer.render(self.text)
        return len(jsontext.dumpb(text_frame("c-1", "chatcmpl-" + "0" * 20, self.text, html)))


def paced_answer(pace: TextPace, tokens: int, rate: float) -> list[tuple[float, int]]:
    """(time, bytes) of each text frame of an answer whose tokens arrive `rate` a second, sent the way
    the writer sends them: the first at once, each next one as soon as a new token has arrived and
    the pace allows; a text waiting for the budget goes when the end frame is queued behind it."""
    frames = AnswerFrames()
    end = (tokens - 1) / rate
    now, have = 0.0, 1
    sent = [(now, frames.size(have))]
    pace.sent(now, sent[-1][1], first=True)
    while have < tokens:
        now = max(now + max(0.0, pace.interval_wait(now)), have / rate)  # the interval, then a new token
        if now < end:
            now = min(now + pace.budget_wait(now), end)
        have = min(tokens, math.floor(now * rate + 1e-9) + 1)
        sent.append((now, frames.size(have)))
        pace.sent(now, sent[-1][1], first=False)
    return sent


def default_pace() -> TextPace:
    ws = Settings().ws
    return TextPace(ws.frame_interval_ms / 1000, ws.bytes_per_second, ws.burst_bytes)


def test_defaults_keep_a_2000_token_answer_at_30_tokens_a_second_under_2_mb() -> None:
    paced = paced_answer(default_pace(), 2000, 30)
    assert sum(size for _, size in paced) <= 2_000_000  # 30 MB at one frame per 50 ms
    assert paced[-1] == (1999 / 30, AnswerFrames().size(2000))  # all the text, when the last token came


def test_defaults_keep_answers_up_to_300_tokens_at_the_frame_interval() -> None:
    sent = paced_answer(default_pace(), 300, 30)
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:])]
    assert max(gaps) <= 0.05 + 1e-9
    assert sent == paced_answer(TextPace(0.05, 0, 0), 300, 30)  # the budget never held a frame


def test_a_frame_waits_while_the_answer_is_in_debt() -> None:
    pace = TextPace(0.05, rate=100, burst=1000)
    pace.sent(10.0, 1500, first=True)  # 500 bytes over the burst: 5 s at 100 bytes/s
    assert pace.interval_wait(10.0) == pytest.approx(0.05)
    assert pace.interval_wait(10.03) == pytest.approx(0.02)
    assert pace.budget_wait(10.0) == pytest.approx(5.0)
    assert pace.budget_wait(12.0) == pytest.approx(3.0)
    assert pace.budget_wait(15.0) == 0.0
    pace.sent(15.0, 200, first=False)
    assert pace.budget_wait(15.0) == pytest.approx(2.0)


def test_the_budget_saves_up_no_more_than_the_burst() -> None:
    pace = TextPace(0.05, rate=100, burst=1000)
    pace.sent(0.0, 0, first=True)
    pace.sent(100.0, 3000, first=False)  # 100 s of silence refilled the bucket only up to 1000 bytes
    assert pace.budget_wait(100.0) == pytest.approx(20.0)


def test_each_answer_starts_with_a_full_budget() -> None:
    pace = TextPace(0.05, rate=100, burst=1000)
    pace.sent(0.0, 5000, first=True)
    assert pace.budget_wait(0.0) == pytest.approx(40.0)
    pace.sent(1.0, 400, first=True)  # the next answer
    assert pace.budget_wait(1.0) == 0.0


def test_without_a_burst_frames_are_spaced_by_their_size() -> None:
    pace = TextPace(0.05, rate=1000, burst=0)
    pace.sent(0.0, 20, first=True)
    assert pace.budget_wait(0.0) == pytest.approx(0.02)  # under the interval: the interval decides
    pace.sent(0.05, 480, first=False)
    assert pace.budget_wait(0.05) == pytest.approx(0.48)  # as long as the frame takes at the rate


def test_rate_zero_turns_the_budget_off() -> None:
    pace = TextPace(0.05, rate=0, burst=0)
    pace.sent(0.0, 10**9, first=True)
    assert pace.budget_wait(0.0) == 0.0


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10**5), burst=st.integers(0, 10**6),
       frames=st.lists(st.tuples(st.integers(1, 10**5), st.floats(0, 5)), min_size=1, max_size=60))
def test_what_an_answer_sends_before_its_last_frame_is_linear_in_its_duration(
        rate: int, burst: int, frames: list[tuple[int, float]]) -> None:
    """Frames of any size sent whenever the pace allows or later: before each frame, the answer has
    sent at most burst + rate × its age."""
    pace = TextPace(0.05, rate, burst)
    now, spent = 0.0, 0
    for n, (size, later) in enumerate(frames):
        if n:
            now += max(0.0, pace.interval_wait(now), pace.budget_wait(now)) + later
            assert spent <= burst + rate * now + 1e-6 * (burst + rate * now)
        pace.sent(now, size, first=n == 0)
        spent += size


# --- the real app on loopback, a fake upstream streaming paced pieces ---

async def answer_frames(ws: Any) -> tuple[list[tuple[float, int, dict[str, Any]]], list[dict[str, Any]]]:
    """(arrival, bytes, frame) of each text frame of one answer, and every frame that ends it (read
    until a short quiet after the first end frame, so a second one would show)."""
    texts: list[tuple[float, int, dict[str, Any]]] = []
    ends: list[dict[str, Any]] = []
    while True:
        try:
            message = await ws.receive(timeout=5 if not ends else 0.3)
        except TimeoutError:
            assert ends, "no end frame within 5 s"
            return texts, ends
        if message.type != WSMsgType.TEXT:
            assert ends, f"the socket ended before the answer: {message.type}"
            return texts, ends
        frame = jsontext.parse(message.data)
        if frame.get("isDone") or ends:
            ends.append(frame)
        elif "heart" not in frame:
            texts.append((time.monotonic(), len(message.data.encode()), frame))


async def test_a_long_answer_sends_bytes_linear_in_its_duration_and_all_its_text(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    rate, burst = 20_000, 5_000
    client = await make_client(ws={"frame_interval_ms": 10, "bytes_per_second": rate, "burst_bytes": burst})
    pieces = [f" word{n:03d}" for n in range(120)]
    fake.script.append(Stream(pieces=pieces, delay=0.005))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        texts, ends = await answer_frames(ws)
    assert [f["content"] for f in ends] == ["DONE"]
    assert texts[-1][2]["content"] == "".join(pieces)
    assert len({f["id"] for _, _, f in texts}) == 1
    contents = [f["content"] for _, _, f in texts]
    assert all(b.startswith(a) and b != a for a, b in zip(contents, contents[1:]))
    duration = texts[-1][0] - texts[0][0]
    final = texts[-1][1]
    # Before its last frame an answer sends at most burst + rate × duration, and one frame may take it
    # into debt: the bound plus the last two frames (a little slack for the clocks on each side).
    assert sum(size for _, size, _ in texts) <= burst + rate * (duration + 0.02) + 2 * final


async def test_the_last_text_is_not_held_for_the_budget(make_client: MakeClient, fake: FakeOpenAI) -> None:
    # A budget so small that, after the first frame, the next would wait for minutes.
    client = await make_client(ws={"frame_interval_ms": 10, "bytes_per_second": 1, "burst_bytes": 0})
    pieces = [f"piece{n} " for n in range(20)]
    fake.script.append(Stream(pieces=pieces, delay=0.01))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        texts, ends = await answer_frames(ws)
    assert [f["content"] for f in ends] == ["DONE"]
    assert [f["content"] for _, _, f in texts] == ["piece0 ", "".join(pieces)]


async def test_a_heartbeat_is_answered_while_a_text_waits_for_the_budget(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(ws={"frame_interval_ms": 10, "bytes_per_second": 1, "burst_bytes": 0})
    pieces = [f"piece{n} " for n in range(30)]
    fake.script.append(Stream(pieces=pieces, delay=0.01))
    async with ws_connect(client) as ws:
        await ws.send_json(question())
        first = await ws.receive_json(timeout=5)
        await ws.send_json({"heart": "ping"})
        frames = [first]
        while not frames[-1].get("isDone"):
            frames.append(await ws.receive_json(timeout=5))
    pongs = [n for n, f in enumerate(frames) if f.get("heart") == "pong"]
    assert len(pongs) == 1 and pongs[0] < len(frames) - 2  # before the answer's end, not after it
    texts = [f["content"] for f in frames if "heart" not in f and not f.get("isDone")]
    assert texts[-1] == "".join(pieces) and frames[-1]["content"] == "DONE"
