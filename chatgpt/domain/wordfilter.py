"""Sensitive words: one Aho-Corasick automaton, and maskers that hide listed words even when split across deltas."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path

from .textfold import normalize, normalize_char
from .wordmask import MASK, CumulativeMasker, DeltaMasker, GrowingMasker, Scanner

__all__ = ["MASK", "WordFilter", "WordListError", "normalize"]


class WordListError(Exception):
    """The words file cannot be read or is not UTF-8; the message names the file."""


class WordFilter:
    """An immutable set of listed words; build a new one to reload, and swap the reference."""

    def __init__(self, words: Iterable[str]) -> None:
        # a "word" of stars alone would match every mask it produced: it is not a word
        normal = sorted({n for n in (normalize(w.strip()) for w in words) if n.strip(MASK)})
        self.size = len(normal)
        self.longest = max((len(w) for w in normal), default=0)
        # State 0 is the root. goto[s][ch] -> state; depth[s] = length of the prefix s spells;
        # hit[s] = length of the longest listed word that ends at s (0: none), through fail links;
        # keep[s] = length of the longest suffix that could still grow into a word (what to hold back).
        self._goto: list[dict[str, int]] = [{}]
        self._depth: list[int] = [0]
        self.hit: list[int] = [0]
        for word in normal:
            state = 0
            for ch in word:
                nxt = self._goto[state].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][ch] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    self.hit.append(0)
                state = nxt
            self.hit[state] = len(word)
        self._fail = [0] * len(self._goto)
        self.keep = [0] * len(self._goto)
        queue: deque[int] = deque(self._goto[0].values())
        while queue:
            state = queue.popleft()
            # BFS: the fail target is shallower, so its keep is already known. A state without
            # children is a finished word: only a suffix that can still grow must be held back.
            self.keep[state] = self._depth[state] if self._goto[state] else self.keep[self._fail[state]]
            for ch, nxt in self._goto[state].items():
                queue.append(nxt)
                back = self._fail[state]
                while back and ch not in self._goto[back]:
                    back = self._fail[back]
                target = self._goto[back].get(ch, 0)
                self._fail[nxt] = target if target != nxt else 0
                self.hit[nxt] = max(self.hit[nxt], self.hit[self._fail[nxt]])

    @classmethod
    def from_file(cls, path: str | Path) -> WordFilter:
        """Load a UTF-8 file, one word a line; blank lines and surrounding spaces are ignored."""
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise WordListError(f"words file {path}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise WordListError(f"words file {path}: not UTF-8 (byte {exc.start})") from None
        return cls(text.splitlines())

    def step(self, state: int, ch: str) -> int:
        """The automaton's next state after one normalised character."""
        goto, fail = self._goto, self._fail
        while True:
            nxt = goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = fail[state]

    def contains(self, text: str) -> bool:
        """Whether `text` contains a listed word (for prompts)."""
        if not self.size:
            return False
        state, hit, step = 0, self.hit, self.step
        for char in text:
            for ch in normalize_char(char):
                state = step(state, ch)
                if hit[state]:
                    return True
        return False

    def mask(self, text: str, star: str = MASK) -> str:
        """`text` with every character of every listed word replaced by `star`."""
        scanner = Scanner(self)
        scanner.feed(text)
        return scanner.render(text, 0, star)

    def cumulative(self, star: str = MASK) -> CumulativeMasker:
        """A masker for a text that only grows (websocket frames carry the whole answer so far).

        `star="\\*"` gives Markdown source in which the masks stay literal stars, not emphasis."""
        return CumulativeMasker(self, star)

    def growing(self, stars: tuple[str, ...] = (MASK,)) -> GrowingMasker:
        """A masker for a text shown whole as it grows by deltas, kept as parts (websocket frames): one
        rendering per star, e.g. `(MASK, "\ue000")` for the text and a Markdown source of its HTML."""
        return GrowingMasker(self, stars)

    def stream(self) -> DeltaMasker:
        """A masker for deltas sent one after the other (streamed HTTP): holds back a possible word start."""
        return DeltaMasker(self)
