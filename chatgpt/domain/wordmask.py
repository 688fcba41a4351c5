"""Masking listed words in streamed text: the scanner and the two maskers built on it (websocket, streamed HTTP)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .textfold import normalize_char

if TYPE_CHECKING:  # the filter builds maskers; at run time only its attributes are used
    from .wordfilter import WordFilter

MASK = "*"


class Scanner:
    """Runs the automaton over original characters and records which of them listed words cover."""

    def __init__(self, words: WordFilter) -> None:
        self._words = words
        self._state = 0
        self.pos = 0  # original characters consumed
        self.hits = 0  # listed words completed so far (refuse mode stops at the first)
        # Normalised lengths of the last original characters that could still belong to a word;
        # everything before them is final (`stable`).
        self._tail: deque[int] = deque()
        self._tail_sum = 0
        # Merged [start, end) ranges of original positions to mask, in order.
        self.masks: list[list[int]] = []

    @property
    def stable(self) -> int:
        """Original position before which no character can be masked any more."""
        return self.pos - len(self._tail)

    def feed(self, text: str) -> None:
        """Consume more original text."""
        words = self._words
        if not words.size:
            self.pos += len(text)
            return
        step, hit, keep_of = words.step, words.hit, words.keep
        state, tail, masks = self._state, self._tail, self.masks
        for char in text:
            norm = normalize_char(char)
            tail.append(len(norm))
            self._tail_sum += len(norm)
            for index, ch in enumerate(norm):
                state = step(state, ch)
                length = hit[state]
                if length:
                    self.hits += 1
                    self._cover(length - index - 1, masks)
            # Keep the shortest tail that still holds the longest word prefix the text ends with.
            keep = keep_of[state]
            while tail and self._tail_sum - tail[0] >= keep:
                self._tail_sum -= tail.popleft()
            self.pos += 1
        self._state = state

    def _cover(self, before: int, masks: list[list[int]]) -> None:
        """Mask the current character and enough earlier ones to hold `before` more normalised chars."""
        start = self.pos
        index = len(self._tail) - 1
        while before > 0 and index > 0:  # the automaton guarantees the tail holds the whole word
            index -= 1
            before -= self._tail[index]
            start -= 1
        end = self.pos + 1
        while masks and masks[-1][1] >= start:
            start = min(start, masks.pop()[0])
        masks.append([start, end])

    def render(self, text: str, offset: int, star: str = MASK) -> str:
        """`text` (original characters from position `offset`) with each masked character as `star`."""
        end = offset + len(text)
        parts: list[str] = []
        last = offset
        for lo, hi in self.masks:
            if hi <= last:
                continue
            if lo >= end:
                break
            lo = max(lo, last)
            hi = min(hi, end)
            parts.append(text[last - offset:lo - offset])
            parts.append(star * (hi - lo))
            last = hi
        if not parts:
            return text
        parts.append(text[last - offset:])
        return "".join(parts)

    def forget_before(self, position: int) -> None:
        """Drop mask ranges that end before `position` (already rendered and sent)."""
        masks = self.masks
        drop = 0
        while drop < len(masks) and masks[drop][1] <= position:
            drop += 1
        if drop:
            del masks[:drop]


class CumulativeMasker:
    """Given the whole answer so far, each time, returns it masked; scans and renders only what is new."""

    def __init__(self, words: WordFilter, star: str = MASK) -> None:
        self._words = words
        self._star = star
        self._reset()

    def _reset(self) -> None:
        self._scanner = Scanner(self._words)
        self._text = ""
        self._done = ""  # the masked text before `_done_at`, which can no longer change
        self._done_at = 0

    @property
    def hits(self) -> int:
        """Listed words completed so far."""
        return self._scanner.hits

    def update(self, text: str) -> str:
        """The whole text so far, masked. A text that does not extend the previous one starts over."""
        if not text.startswith(self._text):
            self._reset()
        scanner = self._scanner
        scanner.feed(text[len(self._text):])
        self._text = text
        if not scanner.hits:
            return text  # nothing masked yet: no copy at all
        stable = scanner.stable
        if stable > self._done_at:
            self._done += scanner.render(text[self._done_at:stable], self._done_at, self._star)
            self._done_at = stable
            scanner.forget_before(stable)
        return self._done + scanner.render(text[stable:], stable, self._star)


class DeltaMasker:
    """Fed deltas, returns what is safe to send now; holds back only a tail that could still become a word."""

    def __init__(self, words: WordFilter) -> None:
        self._scanner = Scanner(words)
        self._pending = ""  # original characters received but not yet returned
        self._sent = 0  # original position up to which text has been returned

    @property
    def hits(self) -> int:
        """Listed words completed so far."""
        return self._scanner.hits

    @property
    def held(self) -> str:
        """The characters held back right now (unmasked: not a word yet)."""
        return self._pending

    def feed(self, delta: str) -> str:
        """Consume `delta`; return the masked text that can no longer change."""
        scanner = self._scanner
        scanner.feed(delta)
        self._pending += delta
        return self._release(scanner.stable)

    def flush(self) -> str:
        """The end of the answer: everything still held, masked where words completed."""
        return self._release(self._scanner.pos)

    def _release(self, upto: int) -> str:
        count = upto - self._sent
        if count <= 0:
            return ""
        out = self._scanner.render(self._pending[:count], self._sent)
        self._pending = self._pending[count:]
        self._sent = upto
        self._scanner.forget_before(upto)
        return out


class GrowingMasker:
    """A text that grows by deltas and is shown whole each time (websocket frames), kept as parts that are
    joined only when a frame goes out: `parts[i]` joined is the text so far masked with `stars[i]` (one
    rendering per star, e.g. the shown text and its Markdown source). Each `feed` costs the delta and the
    held tail, never the whole text. The last part is the tail that could still become a word, rendered
    with the masks known so far (it is replaced at the next feed)."""

    def __init__(self, words: WordFilter, stars: tuple[str, ...] = (MASK,)) -> None:
        self._scanner = Scanner(words)
        self._stars = stars
        self._pending = ""  # original characters after `_sent`: the tail that may still change
        self._sent = 0  # original position up to which the parts are final
        self.parts: tuple[list[str], ...] = tuple([] for _ in stars)

    @property
    def hits(self) -> int:
        """Listed words completed so far."""
        return self._scanner.hits

    def feed(self, delta: str) -> None:
        """Append `delta` to the text; every rendering in `parts` follows."""
        scanner = self._scanner
        scanner.feed(delta)
        pending = self._pending + delta
        stable = scanner.stable
        count = stable - self._sent
        for parts, star in zip(self.parts, self._stars):
            if parts and self._pending:
                parts.pop()  # the previous tail, rendered again below
            if count > 0:
                parts.append(scanner.render(pending[:count], self._sent, star))
            if count < len(pending):
                parts.append(scanner.render(pending[count:], stable, star))
        self._pending = pending[count:]
        if count > 0:
            self._sent = stable
            scanner.forget_before(stable)
