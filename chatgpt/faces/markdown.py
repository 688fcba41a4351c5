"""Markdown to HTML for the `html` field of websocket frames; raw HTML from the model is escaped."""
from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token

# html=False escapes any raw HTML the model writes instead of passing it to the client's
# rich-text view; markdown-it also refuses javascript:/vbscript:/data: links by default.
_md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])


def _html_renderer() -> RendererHTML:
    """markdown-it's renderer, typed as a protocol: the paragraph shortcut needs its renderInline."""
    renderer = _md.renderer
    if not isinstance(renderer, RendererHTML):
        raise TypeError("markdown-it's renderer is not RendererHTML")
    return renderer


_renderer = _html_renderer()

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A line that could continue the block before a blank line: indented, a list item, a quote or a
# table row. Splitting there could change how the earlier block renders (e.g. a loose list).
_CONTINUES = re.compile(r"^(\s|[-*+>|]|\d{1,9}[.)]|$)")
# First characters of a line that may still turn out to continue the block before it or to open a
# fence, depending on what follows them on the line (whitespace, list markers and digits, `>`, `|`,
# fence characters).
_MAY_CONTINUE = frozenset(" \t\n\r\x0b\x0c-*+>|`~0123456789")


# Text that markdown-it renders as one plain paragraph whatever its content: no character any inline
# rule (or HTML escaping) acts on, no line that could start or end a block (a heading, list, quote,
# fence, indented code, setext underline, table), no blank line, no edge whitespace on any line.
# Rendering it costs markdown-it ~50 µs however short it is (a frame's tail is often such a line).
_SPECIAL = re.compile(r'[\\`*_\[\]!<>&~"|\r\x00]|\n\s|\s\n|\n[#\-+=:\d]|\n$|^[#\-+=:\d\s]|\s$')


# Text that markdown-it's block parser makes one paragraph, whatever inline Markdown it holds: no line
# that starts with anything that could open or continue a block (a heading, list, quote, fence, code,
# thematic break, setext underline, reference definition), no blank line, no `|` (a table can
# interrupt a paragraph), no edge whitespace (a paragraph's content is stripped), nothing markdown-it
# normalizes first. Its HTML is then `<p>` + the inline rendering + `</p>`: the block parse, about half
# of the cost of a short paragraph, is skipped. A websocket frame's tail is most often such a text.
_NOT_ONE_PARAGRAPH = re.compile(r"(?:^|\n)(?:[\s#\-+*>=_`~\[<]|\d{1,9}[.)])|\s$|[|\r\x00]")


def _paragraph_html(text: str) -> str:
    """The HTML markdown-it gives for `text`, which `_NOT_ONE_PARAGRAPH` found to be one paragraph."""
    env: dict[str, object] = {}
    tokens: list[Token] = []
    _md.inline.parse(text, _md, env, tokens)
    for token in tokens:
        if token.type == "text_special":  # what markdown-it's core rule text_join does for escapes and entities
            token.type = "text"
    inline: str = _renderer.renderInline(tokens, _md.options, env)
    return "<p>" + inline + "</p>\n"


def to_html(text: str) -> str:
    """Render one answer's Markdown to an HTML string."""
    if text and _SPECIAL.search(text) is None:
        return "<p>" + text.replace("\n", "<br />\n") + "</p>\n"  # what markdown-it gives for it
    if text and _NOT_ONE_PARAGRAPH.search(text) is None:
        return _paragraph_html(text)
    html: str = _md.render(text)
    return html


class IncrementalRenderer:
    """Renders a growing answer without redoing all of it for every frame.

    A cumulative answer only grows. Once a blank line outside any code fence is followed by a line
    that starts a new top-level block, everything before it renders the same whatever comes later,
    so its HTML is kept and only the tail is rendered again. The cost per frame is bounded by the
    last block, not by the whole answer.

    Whether a line after a blank one starts a new block depends on what came before: after a run of
    lines that are all plain paragraph lines, any line does (a list or a quote starts afresh); after a
    list, a quote, indented code or a table, a line that could belong to it (indented, a list marker,
    `>`, `|`) may continue it and is not a split point. A line still being written is a split point
    as soon as its first character says so."""

    # One per websocket: slots keep its attributes without a dict (an idle socket costs ~20 KB in all).
    __slots__ = ("_blank_before", "_fence", "_html", "_plain_before", "_plain_run", "_scanned", "_source")

    def __init__(self) -> None:
        self._source = ""  # the stable prefix of the answer
        self._html = ""  # its rendered HTML
        self._fence: str | None = None  # the fence open at the end of the scanned text, if any
        self._scanned = 0  # offset up to which lines have been scanned for fences and splits
        self._blank_before = False  # the last scanned line was blank (outside a fence)
        self._plain_run: bool | None = None  # the lines since the last blank one are all plain (None: no line yet)
        self._plain_before = False  # the run of lines before the last blank line was all plain

    def render(self, text: str) -> str:
        """The HTML of `text`, which must extend the previously rendered text (else start over)."""
        if not text.startswith(self._source):
            self.__init__()  # type: ignore[misc]
        if "]:" in text:
            # Maybe a link reference definition: it changes links in every block, before it too.
            return to_html(text)
        split = self._advance(text)
        if split > len(self._source):
            # Without its trailing blank lines, which change nothing, a finished paragraph takes the shortcut.
            self._html += to_html(text[len(self._source):split].rstrip("\n"))
            self._source = text[:split]
        return self._html + to_html(text[len(self._source):])

    def _advance(self, text: str) -> int:
        """Scan complete lines after `_scanned`; return the furthest safe split point."""
        split = len(self._source)
        position = self._scanned
        blank_before, plain_run, plain_before = self._blank_before, self._plain_run, self._plain_before
        while True:
            end = text.find("\n", position)
            if end < 0:
                break
            line = text[position:end]
            blank = not line.strip(" \t")  # markdown-it's blank line: spaces and tabs only
            fence = _FENCE.match(line)
            plain: bool | None = None  # whether the line is one nothing after a blank line can continue
            if self._fence is not None:
                if fence and fence.group(1)[0] == self._fence[0] and len(fence.group(1)) >= len(self._fence) \
                        and not line.strip().strip(self._fence[0]):
                    self._fence = None
                blank = False  # a blank line inside a fence ends nothing
            elif fence:
                plain = line[0] != " "  # a fence at the margin is inside no list item; an indented one may be
                if blank_before and position > split and (plain or plain_before):
                    split = position
                self._fence = fence.group(1)
            elif not blank:
                plain = not _CONTINUES.match(line)
                if blank_before and position > 0 and (plain or plain_before):
                    split = position
            if blank:
                if plain_run is not None:
                    plain_before, plain_run = plain_run, None
            elif plain is not None:
                plain_run = plain if plain_run is None else plain_run and plain
            blank_before = blank
            position = end + 1
        self._scanned, self._blank_before = position, blank_before
        self._plain_run, self._plain_before = plain_run, plain_before
        # The line being written, after a blank line: its first character alone can already say that it
        # starts a new block which continues nothing before it, so the tail is only that block.
        if blank_before and position > split and position < len(text) \
                and (plain_before or text[position] not in _MAY_CONTINUE):
            split = position
        return split
