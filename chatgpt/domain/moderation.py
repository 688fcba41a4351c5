"""Content safety (PROTOCOL.md E.5): the sensitive-word list and WeChat's content check, applied by the
pipeline to every prompt and every answer, whatever the door."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Literal

from chatgpt.domain.accounting import Meter
from chatgpt.domain.errors import AnswerBlocked, ContentRefused
from chatgpt.domain.wechat import WeChatApi, WeChatRefused, WeChatUnreachable
from chatgpt.domain.wordfilter import WordFilter
from chatgpt.domain.wordmask import Scanner

log = logging.getLogger(__name__)

SEGMENT = 2500  # msgSecCheck v2 reads at most 2,500 characters at a time
Action = Literal["mask", "refuse"]
Target = Literal["prompt", "answer"]


class ContentCheck:
    """WeChat's msgSecCheck v2 with the server's policy for when WeChat cannot say (`wechat.fail_open`)."""

    def __init__(self, api: WeChatApi, fail_open: bool, meter: Meter) -> None:
        self._api = api
        self._fail_open = fail_open
        self._meter = meter

    async def verdict(self, text: str, openid: str, target: Target) -> Literal["pass", "risky", "unchecked"]:
        """`pass` (WeChat's pass or review: allowed; review is logged), `risky`, or `unchecked` when WeChat
        could not be asked or refused to answer and the policy is to refuse (fail closed)."""
        try:
            suggest = await self._api.msg_sec_check(text[:SEGMENT], openid)
        except (WeChatUnreachable, WeChatRefused) as exc:
            why = f"errcode {exc.errcode}" if isinstance(exc, WeChatRefused) else "unreachable"
            log.warning("WeChat content check of a%s %s failed (%s): %s", "n" if target == "answer" else "",
                        target, why, "allowed (fail open)" if self._fail_open else "refused (fail closed)")
            self._meter.content_checked(target, "failed")
            return "pass" if self._fail_open else "unchecked"
        self._meter.content_checked(target, suggest)
        if suggest == "review":
            log.info("WeChat content check: %s of user …%s to review (allowed)", target, openid[-4:])
        elif suggest == "risky":
            log.info("WeChat content check: %s of user …%s is risky", target, openid[-4:])
        return "pass" if suggest == "review" else suggest


class Moderation:
    """The current word list (an immutable WordFilter, swapped whole on reload), what to do when an answer
    holds a word, and WeChat's check when `wechat.msg_sec_check` is on (set once WeChat's client exists)."""

    def __init__(self, words: WordFilter, action: Action = "mask",
                 load: Callable[[], WordFilter] | None = None) -> None:
        self.words = words
        self.action: Action = action
        self._load = load  # reads the configured words file again; None when there is none
        self.wechat: ContentCheck | None = None

    @classmethod
    def configured(cls, words_file: str, action: str) -> Moderation:
        """The list of `moderation.words_file` (empty without one) and `moderation.action` (mask unless
        refuse); WordListError when the file cannot be read."""
        chosen: Action = "refuse" if action == "refuse" else "mask"
        if not words_file:
            return cls(WordFilter(()), chosen)

        def load() -> WordFilter:
            return WordFilter.from_file(words_file)
        return cls(load(), chosen, load)

    def reload(self) -> int:
        """Read the words file again and use it from the next answer on; how many words it holds. Raises
        WordListError and keeps the current list when the file cannot be read."""
        if self._load is not None:
            self.words = self._load()  # answers under way keep the filter they started with
        return self.words.size

    def check_words(self, prompt: str) -> None:
        """Refuse a prompt with a listed word (before it costs anything)."""
        if self.words.contains(prompt):
            raise ContentRefused("word")

    async def check_prompt(self, prompt: str, user: str | None) -> None:
        """WeChat's check of a logged-in user's prompt, before anything goes upstream (a long one in
        segments, asked at once)."""
        if self.wechat is None or user is None or not prompt.strip():
            return
        segments = [prompt[i:i + SEGMENT] for i in range(0, len(prompt), SEGMENT)]
        verdicts = await asyncio.gather(*(self.wechat.verdict(s, user, "prompt") for s in segments))
        for verdict in ("risky", "unchecked"):
            if verdict in verdicts:
                raise ContentRefused(verdict)

    def masking(self) -> WordFilter | None:
        """The filter a door masks an answer's text with (mask mode with listed words), else None."""
        return self.words if self.action == "mask" and self.words.size else None

    def watch(self, user: str | None, check_reasoning: bool = False) -> AnswerWatch:
        """What watches one answer as it grows: listed words in refuse mode, WeChat's check of the segments
        (of the reasoning too when `check_reasoning`: the user is shown it)."""
        refuse = self.words if self.action == "refuse" and self.words.size else None
        return AnswerWatch(refuse, self.wechat if user else None, user or "", check_reasoning)


class AnswerWatch:
    """One answer's content rules. `feed` each piece of answer text and reasoning before it is passed on:
    it raises AnswerBlocked when a listed word completes in either (refuse mode) or a finished WeChat
    check found a segment risky; `finish` checks what is left at the end and waits for every check.
    Checks run as tasks owned by the answer, so the text flows while WeChat is asked (a verdict is
    acted on at the next piece, or at the end); `close` cancels what is still running."""

    def __init__(self, refuse: WordFilter | None, check: ContentCheck | None, user: str,
                 check_reasoning: bool = False) -> None:
        # One scanner per text: a word does not run from the reasoning into the answer.
        self._scanners = (Scanner(refuse), Scanner(refuse)) if refuse is not None else None
        self._check = check
        self._user = user
        self._check_reasoning = check_reasoning  # the reasoning is shown to the user (ws.reasoning live)
        self._unchecked = ["", ""]  # answer text, reasoning not yet sent to WeChat (under one segment each)
        self._checks: list[asyncio.Task[str]] = []

    @property
    def active(self) -> bool:
        """Whether anything is watched at all (else feeding costs nothing)."""
        return self._scanners is not None or self._check is not None

    def feed(self, text: str, reasoning: str = "") -> None:
        """More answer text and reasoning; raise AnswerBlocked if what is known so far ends the answer."""
        if self._scanners is not None:
            for scanner, piece in zip(self._scanners, (text, reasoning)):
                if piece:
                    scanner.feed(piece)
                    if scanner.hits:
                        raise AnswerBlocked("word")
        if self._check is None:
            return
        self._verdicts()
        for channel, piece in enumerate((text, reasoning if self._check_reasoning else "")):
            if not piece:
                continue
            unchecked = self._unchecked[channel] + piece
            while len(unchecked) >= SEGMENT:
                self._start(unchecked[:SEGMENT])
                unchecked = unchecked[SEGMENT:]
            self._unchecked[channel] = unchecked

    def _start(self, segment: str) -> None:
        assert self._check is not None
        self._checks.append(asyncio.ensure_future(self._check.verdict(segment, self._user, "answer")))

    def _verdicts(self) -> None:
        """Raise for the first finished check that did not pass; forget the ones that did."""
        still: list[asyncio.Task[str]] = []
        for task in self._checks:
            if not task.done():
                still.append(task)
            elif (verdict := task.result()) != "pass":
                raise AnswerBlocked("risky" if verdict == "risky" else "unchecked")
        self._checks = still

    async def finish(self) -> None:
        """The upstream has ended the answer: check the last segments and wait for every verdict."""
        if self._check is None:
            return
        for channel, unchecked in enumerate(self._unchecked):
            if unchecked.strip():
                self._start(unchecked)
            self._unchecked[channel] = ""
        if self._checks:
            await asyncio.wait(self._checks)
            self._verdicts()

    async def close(self) -> None:
        """The answer ended (however): stop asking WeChat about it."""
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with suppress(asyncio.CancelledError):
                await task
        self._checks.clear()
