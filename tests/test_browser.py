"""The browser demo page at `/`, driven in headless Chromium against the real app and the fake upstream."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp.test_utils import TestClient

from chatgpt.keys import sockets_key
from tests.conftest import USER_KEY, MakeClient, url
from tests.fakes.openai import Fail, FakeOpenAI, Stream
from tests.helpers.frames import wait_until
from tests.helpers.programs import require_program

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page, WebSocket

from playwright.async_api import async_playwright, expect  # noqa: E402  (the `test` extra installs it)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

OpenDemo = Callable[[TestClient], Awaitable["Demo"]]


@dataclass
class Demo:
    """The demo page open in a browser tab, with what it sent and which requests it made."""

    page: Page
    client: TestClient
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # script errors, console errors and warnings (CSP too)

    def questions(self) -> list[dict[str, Any]]:
        """Question frames sent on the websocket (heartbeats left out)."""
        return [f for f in self.sent if "heart" not in f]

    async def open(self) -> None:
        """Load `/` as a browser does and wait until its websocket is open."""
        self.page.on("websocket", self._watch)
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        await self.page.goto(url(self.client, "/"))
        await expect(self.page.locator("#status")).to_have_attribute("data-state", "open")

    def _watch(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    async def ask(self, prompt: str) -> Locator:
        """Type a question, press Enter and return the locator of the finished answer bubble."""
        done_before = await self.page.locator('.msg.assistant[data-done="true"]').count()
        box = self.page.get_by_label("问题")
        await box.fill(prompt)
        await box.press("Enter")
        done = self.page.locator('.msg.assistant[data-done="true"]')
        await expect(done).to_have_count(done_before + 1)
        return done.nth(done_before)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for one test, always closed (warnings are errors). Debian's package: the
    browser `playwright install` would download is never used."""
    executable = require_program("chromium", "chromium")
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def open_demo(browser: Browser) -> AsyncIterator[OpenDemo]:
    """`await open_demo(client)`: the demo page of that app in a phone-sized tab."""
    contexts = []
    demos: list[Demo] = []

    async def start(client: TestClient) -> Demo:
        context = await browser.new_context(viewport={"width": 420, "height": 760}, device_scale_factor=2)
        contexts.append(context)
        demo = Demo(await context.new_page(), client)
        demos.append(demo)
        await demo.open()
        return demo

    yield start
    for context in contexts:
        await context.close()
    for demo in demos:
        origin = url(demo.client, "/")
        assert demo.errors == []
        assert all(u.startswith(origin) for u in demo.requests), demo.requests  # nothing from elsewhere


async def test_page_streams_a_markdown_answer_and_sends_the_mini_programs_frame(
        make_client: MakeClient, fake: FakeOpenAI, open_demo: OpenDemo, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    client = await make_client()
    fake.script.append(Stream(pieces=["Hello", ", ", "**world**", "!\n\n", "- one\n", "- `two`"], delay=0.05))
    demo = await open_demo(client)
    page = demo.page
    # Record every state of the answer bubble and of the send button as the page changes them.
    await page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bubble = document.querySelector('.msg.assistant');
            const sendDisabled = document.querySelector('#send').disabled;
            window.seen.push({text: bubble ? bubble.textContent : '', sendDisabled});
        }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")

    answer = await demo.ask("Say hello")

    assert "<strong>world</strong>" in await answer.inner_html()
    assert "<code>two</code>" in await answer.inner_html()
    final = await answer.text_content()
    assert final.startswith("Hello, world!")
    seen = await page.evaluate("window.seen")
    partial = [s["text"] for s in seen if s["text"] and s["text"] != final]
    assert any(final.startswith(text.strip()) for text in partial), seen  # an intermediate frame was shown
    assert all(s["sendDisabled"] for s in seen if s["text"] and s["text"] != final)  # no sending while it streams
    await expect(page.locator("#send")).to_be_enabled()
    await expect(page.locator(".msg.user")).to_have_text(["Say hello"])

    [frame] = demo.questions()
    assert set(frame) == {"conversationId", "id", "parentId", "authType", "authValue", "isDemo", "content",
                          "isGenImg", "isSender", "messages"}
    assert UUID.match(frame["id"]) and UUID.match(frame["conversationId"])
    assert (frame["authType"], frame["authValue"], frame["isDemo"], frame["content"], frame["isGenImg"],
            frame["isSender"]) == ("api", "Bearer ", True, "", False, False)
    assert frame["messages"] == [{"role": "user", "content": "Say hello"}]
    assert fake.chat_requests()[0].body["messages"][-1] == {"role": "user", "content": "Say hello"}

    shot = tmp_path / "browser.png"
    await page.screenshot(path=str(shot), full_page=True)
    copy = REPO / "test-output" / "browser.png"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, copy)
    with capsys.disabled():
        print(f"\nbrowser screenshot: {copy}")


async def test_context_carries_the_last_four_items_on_screen(make_client: MakeClient, fake: FakeOpenAI,
                                                              open_demo: OpenDemo) -> None:
    client = await make_client()
    fake.script.extend([Stream(pieces=["one"], answer_id="a-1"), Stream(pieces=["two"], answer_id="a-2"),
                        Stream(pieces=["three"], answer_id="a-3")])
    demo = await open_demo(client)
    for prompt in ("q1", "q2", "q3"):
        await demo.ask(prompt)
    frames = demo.questions()
    assert frames[2]["messages"] == [{"role": "assistant", "content": "one"}, {"role": "user", "content": "q2"},
                                     {"role": "assistant", "content": "two"}, {"role": "user", "content": "q3"}]
    # The parent is the last answer's id: the server's own, one per answer (PROTOCOL.md E.1), not the upstream's.
    parents = [f.get("parentId") for f in frames]
    assert all(re.fullmatch(r"chatcmpl-[0-9a-f]{20}", str(p)) for p in parents[1:]) and parents[1] != parents[2]
    assert len({f["id"] for f in frames}) == 3 and len({f["conversationId"] for f in frames}) == 1


async def test_upstream_error_shows_an_error_bubble(make_client: MakeClient, fake: FakeOpenAI,
                                                    open_demo: OpenDemo) -> None:
    client = await make_client()
    fake.script.append(Fail(500, "boom"))
    demo = await open_demo(client)
    answer = await demo.ask("Will this work?")
    await expect(answer).to_have_class(re.compile(r"\berror\b"))
    await expect(answer).to_have_text("boom")
    await expect(demo.page.locator("#send")).to_be_enabled()  # the next question can be asked


async def test_quota_button_shows_the_questions_left_today(make_client: MakeClient, open_demo: OpenDemo) -> None:
    client = await make_client(quota={"daily_questions": 5})
    demo = await open_demo(client)
    quota = demo.page.get_by_role("button", name="查询剩余次数")
    await quota.click()
    await expect(quota).to_have_attribute("data-remaining", "5")
    await expect(quota).to_contain_text("5")
    await demo.ask("one question")
    await quota.click()
    await expect(quota).to_have_attribute("data-remaining", "4")
    assert [f["messages"] for f in demo.questions()][0] == [{"role": "user", "content": "查询次数"}]
    assert await demo.page.locator(".msg").count() == 2  # asking for the quota adds no bubbles


async def test_image_mode_shows_the_saved_picture(make_client: MakeClient, fake: FakeOpenAI,
                                                  open_demo: OpenDemo) -> None:
    client = await make_client(upstream={"api_keys": []})  # the offline provider draws a placeholder
    demo = await open_demo(client)
    await demo.page.get_by_label("图片模式").check()
    answer = await demo.ask("a grey square")
    image = answer.locator("img")
    await expect(image).to_have_attribute("src", re.compile(r"/res/[\w-]+\.png$"))
    await expect(image).to_have_js_property("complete", True)
    assert await image.evaluate("img => img.naturalWidth") > 0
    [frame] = demo.questions()
    assert (frame["isGenImg"], frame["content"]) == (True, "a grey square")
    assert fake.requests == []


async def test_own_key_is_kept_in_local_storage_and_used_instead_of_the_demo_quota(
        make_client: MakeClient, fake: FakeOpenAI, open_demo: OpenDemo) -> None:
    client = await make_client()
    demo = await open_demo(client)
    await demo.page.get_by_label("API Key").fill(USER_KEY)
    await demo.page.reload()
    await expect(demo.page.locator("#status")).to_have_attribute("data-state", "open")
    await expect(demo.page.get_by_label("API Key")).to_have_value(USER_KEY)
    await demo.ask("my own key")
    frame = demo.questions()[-1]
    assert (frame["authValue"], frame["isDemo"]) == (f"Bearer {USER_KEY}", False)
    assert fake.chat_requests()[-1].authorization == f"Bearer {USER_KEY}"


async def test_heartbeat_every_30_seconds_and_reconnect_after_the_socket_closes(
        make_client: MakeClient, open_demo: OpenDemo) -> None:
    client = await make_client()
    demo = await open_demo(client)
    await demo.page.clock.install()  # before the next load: the page's timers are then under test control
    await demo.page.reload()
    await expect(demo.page.locator("#status")).to_have_attribute("data-state", "open")
    await demo.page.clock.run_for(30_000)
    await wait_until(lambda: any(f.get("heart") == "pong" for f in demo.received))
    assert demo.sent == [{"heart": "ping"}]

    for ws in list(client.app[sockets_key]):
        await ws.close()
    await expect(demo.page.locator("#status")).to_have_attribute("data-state", "closed")
    await demo.page.clock.run_for(2_000)  # the first retry comes after about a second
    await expect(demo.page.locator("#status")).to_have_attribute("data-state", "open")
    answer = await demo.ask("still there?")
    await expect(answer).to_have_text("Hello, world!")
