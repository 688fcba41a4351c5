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
# The same for a piece of text inside a paragraph (the block structure checked already): what makes its
# inline rendering more than the text with `<br />` at its line breaks.
_INLINE_SPECIAL = re.compile(r'[\\`*_\[\]!<>&~"|\r\x00]|\n\s|\s\n|\s$')


# Text that markdown-it's block parser makes one paragraph, whatever inline Markdown it holds: no line
# that starts with anything that could open or continue a block (a heading, list, quote, fence, code,
# thematic break, setext underline, reference definition), no blank line, no `|` (a table can
# interrupt a paragraph), no edge whitespace (a paragraph's content is stripped), nothing markdown-it
# normalizes first. Its HTML is then `<p>` + the inline rendering + `</p>`: the block parse, about half
# of the cost of a short paragraph, is skipped. A websocket frame's tail is most often such a text.
_NOT_ONE_PARAGRAPH = re.compile(r"(?:^|\n)(?:[\s#\-+*>=_`~\[<]|\d{1,9}[.)])|\s$|[|\r\x00]")


# Characters that, left as literal text by the inline parse (nothing closed them), could still pair
# with something later in the paragraph: emphasis and strikethrough delimiters, a code span's
# backticks, a link's bracket, an autolink's `<`; and `&`, which could be an entity cut in two.
_MAY_OPEN = re.compile(r"[*_~`\[<&]")
# After a failed try to settle more of a growing paragraph (something in it was still open), the next
# try waits until its unsettled part has grown by this many characters.
PARAGRAPH_STEP = 24


def _inline_html(text: str) -> tuple[str, bool]:
    """markdown-it's inline HTML for `text` and whether the text is closed: nothing in it left open
    that a continuation could still close (`_MAY_OPEN` in no literal text)."""
    env: dict[str, object] = {}
    tokens: list[Token] = []
    _md.inline.parse(text, _md, env, tokens)
    closed = True
    for token in tokens:
        if token.type == "text_special":  # what markdown-it's core rule text_join does for escapes and entities
            token.type = "text"
        if token.type == "text" and closed and _MAY_OPEN.search(token.content):
            closed = False
    inline: str = _renderer.renderInline(tokens, _md.options, env)
    return inline, closed


def _paragraph_html(text: str) -> str:
    """The HTML markdown-it gives for `text`, which `_NOT_ONE_PARAGRAPH` found to be one paragraph."""
    return "<p>" + _inline_html(text)[0] + "</p>\n"


def _cut(text: str) -> int:
    """The last place where a paragraph's text may be cut in two whose inline renderings, put together,
    are the rendering of the whole (when the first part is closed, `_inline_html`): before a letter or
    digit (CJK included) that follows a space, a letter or a digit. A delimiter's meaning depends on the
    characters around it, and these are the same on both sides of such a cut as at the start of a
    text. 0: none."""
    for index in range(len(text) - 1, 0, -1):
        if text[index].isalnum():
            before = text[index - 1]
            if before == " " or before.isalnum():
                return index
    return 0


def to_html(text: str) -> str:
    """Render one answer's Markdown to an HTML string."""
    if text and _SPECIAL.search(text) is None:
        return "<p>" + text.replace("\n", "<br />\n") + "</p>\n"  # what markdown-it gives for it
    body = text.rstrip(" \n")  # a paragraph's trailing spaces and blank lines change nothing
    if body and _NOT_ONE_PARAGRAPH.search(body) is None:
        if _SPECIAL.search(body) is None:
            return "<p>" + body.replace("\n", "<br />\n") + "</p>\n"
        return _paragraph_html(body)
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
    __slots__ = ("_blank_before", "_fence", "_html", "_paragraph", "_plain_before", "_plain_run", "_scanned",
                 "_source")

    def __init__(self) -> None:
        self._source = ""  # the stable prefix of the answer
        self._html = ""  # its rendered HTML
        self._fence: str | None = None  # the fence open at the end of the scanned text, if any
        self._scanned = 0  # offset up to which lines have been scanned for fences and splits
        self._blank_before = False  # the last scanned line was blank (outside a fence)
        self._plain_run: bool | None = None  # the lines since the last blank one are all plain (None: no line yet)
        self._plain_before = False  # the run of lines before the last blank line was all plain
        # The paragraph being written at the end of the text: where it starts, how much of it is settled,
        # the settled part's inline HTML, and the unsettled length at which to try settling more.
        self._paragraph: tuple[int, int, str, int] | None = None

    def render(self, text: str) -> str:
        """The HTML of `text`, which must extend the previously rendered text (else start over)."""
        if not text.startswith(self._source):
            self.__init__()  # type: ignore[misc]
        if "]:" in text:
            # Maybe a link reference definition: it changes links in every block, before it too.
            return to_html(text)
        split = self._advance(text)
        if split > len(self._source):
            # With its trailing blank lines: they are code inside a fence opened in a list item ("- ```").
            self._html += to_html(text[len(self._source):split])
            self._source = text[:split]
        tail = text[len(self._source):]
        body = tail.rstrip(" \n")  # a paragraph's trailing spaces and blank lines change nothing
        if _SPECIAL.search(body) is not None and _NOT_ONE_PARAGRAPH.search(body) is None:
            return self._html + self._growing_paragraph(body)
        return self._html + to_html(tail)

    def _growing_paragraph(self, text: str) -> str:
        """The HTML of `text`, one paragraph with inline Markdown, the tail of the answer. Parsed whole
        for every frame, a paragraph written token by token would cost markdown-it's inline parse,
        ~17 µs plus ~0.5 µs a character, each time (400 µs a frame at 700 characters). Instead, as
        soon as something in it is not plain text, all of it but its last letter is settled if it is
        closed (`_cut`, `_inline_html`): parsed once, its HTML kept. What follows the settled part is
        most often plain text, which needs no parse at all."""
        start = len(self._source)
        kept = self._paragraph
        settled, html, retry = (kept[1], kept[2], kept[3]) if kept is not None and kept[0] == start else (0, "", 0)
        rest = text[settled:]
        plain = _INLINE_SPECIAL.search(rest) is None
        if not plain and len(rest) >= retry and (cut := _cut(rest)):
            more, closed = _inline_html(rest[:cut])
            if closed:
                settled, html, rest, retry = settled + cut, html + more, rest[cut:], 0
                plain = _INLINE_SPECIAL.search(rest) is None
            else:  # something opened in it is still open: try again once more has come
                retry = len(rest) + PARAGRAPH_STEP
        self._paragraph = (start, settled, html, retry)
        inline = rest.replace("\n", "<br />\n") if plain else _inline_html(rest)[0]
        return "<p>" + html + inline + "</p>\n"

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
