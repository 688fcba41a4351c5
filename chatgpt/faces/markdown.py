"""Markdown to HTML for the `html` field of websocket frames; raw HTML from the model is escaped."""
from __future__ import annotations

import re

from markdown_it import MarkdownIt

# html=False escapes any raw HTML the model writes instead of passing it to the client's
# rich-text view; markdown-it also refuses javascript:/vbscript:/data: links by default.
_md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A line that could continue the block before a blank line: indented, a list item, a quote or a
# table row. Splitting there could change how the earlier block renders (e.g. a loose list).
_CONTINUES = re.compile(r"^(\s|[-*+>|]|\d{1,9}[.)]|$)")


# Text that markdown-it renders as one plain paragraph whatever its content: no character any inline
# rule (or HTML escaping) acts on, no line that could start or end a block (a heading, list, quote,
# fence, indented code, setext underline, table), no blank line, no edge whitespace on any line.
# Rendering it costs markdown-it ~50 µs however short it is (a frame's tail is often such a line).
_SPECIAL = re.compile(r'[\\`*_\[\]!<>&~"|\r\x00]|\n\s|\s\n|\n[#\-+=:\d]|\n$|^[#\-+=:\d\s]|\s$')


def to_html(text: str) -> str:
    """Render one answer's Markdown to an HTML string."""
    if text and _SPECIAL.search(text) is None:
        return "<p>" + text.replace("\n", "<br />\n") + "</p>\n"  # what markdown-it gives for it
    html: str = _md.render(text)
    return html


class IncrementalRenderer:
    """Renders a growing answer without redoing all of it for every frame.

    A cumulative answer only grows. Once a blank line outside any code fence is followed by a
    complete line that starts a new top-level block, everything before it renders the same
    whatever comes later, so its HTML is kept and only the tail is rendered again. The cost per
    frame is bounded by the last block, not by the whole answer."""

    # One per websocket: slots keep its attributes without a dict (an idle socket costs ~20 KB in all).
    __slots__ = ("_blank_before", "_fence", "_html", "_scanned", "_source")

    def __init__(self) -> None:
        self._source = ""  # the stable prefix of the answer
        self._html = ""  # its rendered HTML
        self._fence: str | None = None  # the fence open at the end of the scanned text, if any
        self._scanned = 0  # offset up to which lines have been scanned for fences and splits
        self._blank_before = False  # the last scanned line was blank (outside a fence)

    def render(self, text: str) -> str:
        """The HTML of `text`, which must extend the previously rendered text (else start over)."""
        if not text.startswith(self._source):
            self.__init__()  # type: ignore[misc]
        split = self._advance(text)
        if split > len(self._source):
            self._html += to_html(text[len(self._source):split])
            self._source = text[:split]
        return self._html + to_html(text[len(self._source):])

    def _advance(self, text: str) -> int:
        """Scan complete lines after `_scanned`; return the furthest safe split point."""
        split = len(self._source)
        position = self._scanned
        blank_before = self._blank_before
        while True:
            end = text.find("\n", position)
            if end < 0:
                break
            line = text[position:end]
            fence = _FENCE.match(line)
            if self._fence is not None:
                if fence and fence.group(1)[0] == self._fence[0] and len(fence.group(1)) >= len(self._fence) \
                        and not line.strip().strip(self._fence[0]):
                    self._fence = None
            elif fence:
                if blank_before and position > split:
                    split = position
                self._fence = fence.group(1)
            elif line.strip() and blank_before and position > 0 and not _CONTINUES.match(line):
                split = position
            blank_before = not line.strip() and self._fence is None
            position = end + 1
        self._scanned, self._blank_before = position, blank_before
        return split
