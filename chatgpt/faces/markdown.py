"""Markdown to HTML for the `html` field of websocket frames; raw HTML from the model is escaped."""
from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
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

# (A backtick fence's info string holds no backtick: "```a`b" is a paragraph line.)
_FENCE = re.compile(r"^ {0,3}(`{3,}(?=[^`]*$)|~{3,})")
# A line that could continue the block before a blank line: indented, a list item, a quote or a
# table row. Splitting there could change how the earlier block renders (e.g. a loose list).
_CONTINUES = re.compile(r"^(\s|[-*+>|]|\d{1,9}[.)]|$)")
# First characters of a line that may still turn out to continue the block before it or to open a
# fence, depending on what follows them on the line (whitespace, list markers and digits, `>`, `|`,
# fence characters).
_MAY_CONTINUE = frozenset(" \t\n\r\x0b\x0c-*+>|`~0123456789")


# Characters some inline rule (or HTML escaping) acts on, or markdown-it normalizes first.
_MARKUP = re.compile(r'[\\`*_\[\]!<>&~"|\r\x00]')


def _plain(text: str) -> bool:
    """Whether the inline rendering of `text`, a piece of one paragraph (`_one_paragraph`), is the text
    itself with `<br />` at its line breaks: no `_MARKUP` character, no edge whitespace on any line, no
    blank line. markdown-it costs ~50 µs for such a text however short it is (a frame's tail is often
    one). The characters are looked for in C, the lines one by one: one regular expression with all of
    these alternatives took ~30 µs per 1,000 characters, every frame."""
    if not text or text[-1].isspace() or _MARKUP.search(text):
        return False
    lines = text.split("\n") if "\n" in text else [text]
    last = len(lines) - 1
    return not any(not line or (index and line[0].isspace()) or (index < last and line[-1].isspace())
                   for index, line in enumerate(lines))


# A line that could open or continue a block instead of going on with a paragraph: indented (or
# blank), a quote, a reference definition or an autolink/HTML line kept apart, a heading's `#`s or a
# list marker before a space or the line's end ("**Bold**" or "#tag" starts a paragraph line), a
# line of nothing but thematic break or setext underline characters, a fence. (Table rows: `|`
# anywhere, in `_one_paragraph`.)
_BLOCK_LINE = re.compile(r"[\s>\[<]|#{1,6}(?=[ \t]|$)|[-+*](?=[ \t]|$)|\d{1,9}[.)](?=[ \t]|$)|[-*_=](?=[-*_= \t]*$)"
                         r"|```|~~~")


def _one_paragraph(text: str) -> bool:
    """Whether markdown-it's block parser makes `text` one paragraph, whatever inline Markdown it holds:
    no line that could open or continue a block (`_BLOCK_LINE`), no blank line, no `|` (a table can
    interrupt a paragraph), no edge whitespace (a paragraph's content is stripped), nothing markdown-it
    normalizes first. Its HTML is then `<p>` + the inline rendering + `</p>`: the block parse, about
    half of the cost of a short paragraph, is skipped. A websocket frame's tail is most often such a
    text. Line by line rather than one regular expression over the text: that took ~29 µs per
    1,000 characters, this ~1 µs."""
    if not text or text[-1].isspace() or "|" in text or "\r" in text or "\x00" in text:
        return False
    return not any(not line or _BLOCK_LINE.match(line) for line in text.split("\n"))


# Characters that, left as literal text by the inline parse (nothing closed them), could still pair
# with something later in the paragraph: emphasis and strikethrough delimiters, a code span's
# backticks, a link's bracket, an autolink's `<`; and `&`, which could be an entity cut in two.
_MAY_OPEN = re.compile(r"[*_~`\[<&]")
# After a failed try to settle more of a growing paragraph (something in it was still open), the next
# try waits until its unsettled part has grown by this many characters.
PARAGRAPH_STEP = 24


def _paired(text: str, mark: str) -> list[str] | None:
    """`text` split at `mark`: outside and inside of each pair in turn; None when a mark is left unpaired
    or two pairs touch (the marks then form one longer run)."""
    parts = text.split(mark)
    if len(parts) % 2 == 0 or not all(parts[2:-1:2]):
        return None
    return parts


def _strong_html(text: str) -> str | None:
    """The inline HTML of `text` when its only Markdown is bold words, `**X**`, the way models write it
    (or none: plain text); None otherwise. Each X starts and ends with a letter or digit (CJK included)
    and holds no line break, two pairs are never adjacent, and nothing else in the text is markup
    (`_plain` once the `**` are taken out). Each `**` is then a delimiter run of two that can open (the
    one before X: a letter after it) and close (the one after X: a letter before it), whatever is
    outside, and they pair in order: markdown-it gives `<strong>X</strong>` for each, at a cost of
    ~25 µs for the inline parse of a paragraph; this is a split and a join."""
    parts = _paired(text, "**")  # "****": one run of four stars, not two pairs
    if parts is None:
        return None
    bold = parts[1::2]
    if any(not x or "\n" in x or not (x[0].isalnum() and x[-1].isalnum()) for x in bold):
        return None
    if not _plain("".join(parts)):
        return None
    html = "".join(part if index % 2 == 0 else "<strong>" + part + "</strong>" for index, part in enumerate(parts))
    return html.replace("\n", "<br />\n")


# Stands for a code span while the text around it is checked and rendered (`_simple_html`): a punctuation
# character, as the backtick it replaces is for the flanking rules of the `**` beside it.
_CODE_MARK = "\u2e3b"


def _code_spans(text: str) -> tuple[str, list[str]] | None:
    """`text` with each code span `` `X` `` replaced by _CODE_MARK, and the spans' HTML; None unless every
    backtick is one of such pairs around an X with no line break, no space at either end (which
    markdown-it may strip) and nothing markdown-it normalizes first, no two spans touching."""
    parts = _paired(text, "`")  # "``": a run of two
    if parts is None:
        return None
    codes = parts[1::2]
    if any(not code or code[0] == " " or code[-1] == " " or "\n" in code or "\r" in code or "\x00" in code
           for code in codes):
        return None
    return _CODE_MARK.join(parts[0::2]), ["<code>" + escapeHtml(code) + "</code>" for code in codes]


def _simple_html(text: str) -> str | None:
    """The inline HTML of `text` when its only Markdown is code spans (`_code_spans`) and bold words
    (`_strong_html`), as models write most paragraphs; None otherwise. Code spans are taken out first,
    as markdown-it's code rule comes before emphasis: inside them nothing is markup."""
    codes: list[str] = []
    if "`" in text:
        split = _code_spans(text) if _CODE_MARK not in text else None
        if split is None:
            return None
        text, codes = split
    html = _strong_html(text)
    if html is None or not codes:
        return html
    pieces = html.split(_CODE_MARK)
    return "".join(piece + code for piece, code in zip(pieces, codes, strict=False)) + pieces[-1]


def _inline_html(text: str) -> tuple[str, bool]:
    """markdown-it's inline HTML for `text` and whether the text is closed: nothing in it left open
    that a continuation could still close (`_MAY_OPEN` in no literal text)."""
    if ("**" in text or "`" in text) and (simple := _simple_html(text)) is not None:
        return simple, True  # every delimiter in it is paired
    env: dict[str, object] = {}
    tokens: list[Token] = []
    _md.inline.parse(text, _md, env, tokens)
    closed = True
    for token in tokens:
        _join_text(token)
        if token.type == "text" and closed and _MAY_OPEN.search(token.content):
            closed = False
    inline: str = _renderer.renderInline(tokens, _md.options, env)
    return inline, closed


def _join_text(token: Token) -> None:
    """What markdown-it's core rule text_join does to an inline token and its children (an image's alt
    text): escapes and entities become plain text."""
    if token.type == "text_special":
        token.type = "text"
    for child in token.children or ():
        _join_text(child)


def _paragraph_html(text: str) -> str:
    """The HTML markdown-it gives for `text`, which `_one_paragraph` found to be one paragraph."""
    inline = text.replace("\n", "<br />\n") if _plain(text) else _inline_html(text)[0]
    return "<p>" + inline + "</p>\n"


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


# A fenced code block that starts the tail at the margin: its fence and info string (a plain language
# name and words; anything markdown-it would unescape or escape in it takes the full render).
_OPEN_FENCE = re.compile(r"(`{3,}|~{3,})([\w+#.\- ]*)(?:\n|$)", re.ASCII)


def _closing_fence(marker: str) -> re.Pattern[str]:
    """A line that closes a fence opened with `marker`."""
    return re.compile("^ {0,3}" + re.escape(marker[0]) + "{" + str(len(marker)) + r",}[ \t]*$", re.MULTILINE)


def _closed_fence_html(text: str) -> str | None:
    """The HTML of `text` when it is a fenced code block at the margin closed by its last non-blank
    line: the block's lines escaped, as `_open_fence_html` gives them before the closing line came.
    None otherwise."""
    fence = _OPEN_FENCE.match(text)
    if fence is None:
        return None
    closing = _closing_fence(fence.group(1)).search(text, fence.end())
    if closing is None or text[closing.end():].strip(" \n"):
        return None
    return _open_fence_html(text[:closing.start()])


def _open_fence_html(text: str) -> str | None:
    """The HTML of `text` when it is a fenced code block at the margin not closed yet (the fence is the
    last block until it closes): its lines escaped, as markdown-it renders them. None otherwise."""
    fence = _OPEN_FENCE.match(text)
    if fence is None or "\r" in text or "\x00" in text:
        return None
    code = text[fence.end():]
    if _closing_fence(fence.group(1)).search(code):
        return None
    end = code.rfind("\n") + 1
    if not code[end:].strip(" \t"):
        code = code[:end]  # markdown-it leaves out a last line of spaces (the end of the text, a blank line)
    words = fence.group(2).split(maxsplit=1)
    opening = f'<pre><code class="language-{words[0]}">' if words else "<pre><code>"
    return opening + escapeHtml(code) + "</code></pre>\n"


# The first line of a list item at the margin: its marker, then one space and its content, or nothing
# yet. (More spaces after the marker, or none before the content, change where its content starts.)
_ITEM = re.compile(r"([-*+]|\d{1,9}[.)])(?: (?=\S)| ?$)")


_LIST_OPENINGS = {"bullet_list_open": "bullet_list_close", "ordered_list_open": "ordered_list_close"}


def _list_items(text: str) -> list[int] | None:
    """Where each item of `text` starts, when `text` is one tight list at the margin whose items render
    each as they would alone: every line is an item's first line (same kind of marker, content after
    exactly one space) or an indented line (part of the item above it), and no blank line (a loose
    list, or its end), tab (columns) or character markdown-it normalizes first. None otherwise."""
    if "\t" in text or "\r" in text or "\x00" in text:
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ends with a line break
    starts: list[int] = []
    position, kind = 0, ""
    for index, line in enumerate(lines):
        if not line.strip(" "):
            return None
        # An indented line belongs to the item above it (its continuation, or a lazy line): rendered with it.
        if not (line.startswith(" ") and starts):
            item = _ITEM.match(line)
            # ("- - -" is a thematic break, not an item: `_items_html` finds no list in it.)
            if item is None or (starts and item.group(1)[-1] != kind):
                return None
            if item.end() == len(line) and index < len(lines) - 1:
                return None  # an empty item before others: kept simple, the full render takes it
            kind = item.group(1)[-1]
            starts.append(position)
        position += len(line) + 1
    return starts


def _list_opening(item: str) -> str:
    """The opening tag of a list whose first item is `item` (`start` unless an ordered list starts at 1)."""
    marker = _ITEM.match(item)
    number = marker.group(1)[:-1] if marker is not None else ""
    if not number:
        return "<ul>\n"
    return "<ol>\n" if int(number) == 1 else f'<ol start="{int(number)}">\n'


def _items_html(text: str) -> str | None:
    """The `<li>` elements markdown-it gives for `text`, items of one tight list (`_list_items`); None
    when markdown-it finds something else in it (a thematic break, a second list): the full render
    then takes it."""
    env: dict[str, object] = {}
    tokens = _md.parse(text, env)
    if not tokens or tokens[0].type not in _LIST_OPENINGS or tokens[-1].type != _LIST_OPENINGS[tokens[0].type]:
        return None
    if any(token.level == 0 for token in tokens[1:-1]):
        return None  # more than the one list (it is tight: `_list_items` let no blank line in)
    html: str = _renderer.render(tokens, _md.options, env)
    closing = "</ul>\n" if tokens[0].type == "bullet_list_open" else "</ol>\n"
    return html.partition("\n")[2][:-len(closing)]


def to_html(text: str) -> str:
    """Render one answer's Markdown to an HTML string."""
    body = text.rstrip(" \n")  # a paragraph's trailing spaces and blank lines change nothing
    if _one_paragraph(body):
        return _paragraph_html(body)
    html: str = _md.render(text)
    return html


_LIST_MARKS = frozenset("-*+0123456789")


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
    __slots__ = ("_blank_before", "_fence", "_html", "_last", "_list", "_paragraph", "_plain_before", "_plain_run",
                 "_reference", "_scanned", "_source")

    def __init__(self) -> None:
        self._source = ""  # the stable prefix of the answer
        self._html = ""  # its rendered HTML
        self._fence: str | None = None  # the fence open at the end of the scanned text, if any
        self._scanned = 0  # offset up to which lines have been scanned for fences, splits and "]:"
        self._reference = False  # "]:" was seen: every frame is rendered whole
        self._blank_before = False  # the last scanned line was blank (outside a fence)
        self._plain_run: bool | None = None  # the lines since the last blank one are all plain (None: no line yet)
        self._plain_before = False  # the run of lines before the last blank line was all plain
        # The paragraph being written at the end of the text: where it starts, how much of it is settled,
        # the settled part's inline HTML, and the unsettled length at which to try settling more.
        self._paragraph: tuple[int, int, str, int] | None = None
        # The list being written at the end of the text: where it starts, the length of its finished
        # items, and their HTML.
        self._list: tuple[int, int, str] | None = None
        # The last tail rendered as a paragraph or a list without code: where it starts, its text without
        # trailing spaces and line breaks, and its HTML. When the tail is then split off unchanged, the
        # HTML is kept instead of rendered again (`_settled_html`).
        self._last: tuple[int, str, str] | None = None

    def render(self, text: str) -> str:
        """The HTML of `text`, which must extend the previously rendered text (else start over)."""
        if not text.startswith(self._source):
            self.__init__()  # type: ignore[misc]
        if self._reference or text.find("]:", self._scanned) >= 0:
            # Maybe a link reference definition: it changes links in every block, before it too.
            self._reference = True
            return to_html(text)
        split = self._advance(text)
        if split > len(self._source):
            self._html += self._settled_html(text[len(self._source):split])
            self._source = text[:split]
        start = len(self._source)
        tail = text[start:]
        body = tail.rstrip(" \n")  # a paragraph's trailing spaces and blank lines change nothing
        html: str | None
        if _one_paragraph(body):
            html = "<p>" + self._growing_inline(body, start) + "</p>\n"
            self._last = (start, body, html)
            return self._html + html
        first = tail[:1]
        if first in _LIST_MARKS and (html := self._growing_list(tail, start)) is not None:
            # (Blank lines after a fence opened in a list item are code in it: such a list is not kept.)
            self._last = (start, body, html) if "`" not in tail and "~" not in tail else None
            return self._html + html
        if first in "`~" and (html := _open_fence_html(tail)) is not None:
            return self._html + html
        return self._html + to_html(tail)

    def _settled_html(self, chunk: str) -> str:
        """The HTML of `chunk`, the blocks just split off the tail, without a full markdown-it render (~50 µs
        and more, once per block of the answer) where the chunk is one block the tail's own paths render:
        - the tail of the last frame, with blank lines after it (which change neither a paragraph nor a
          tight list without code): that frame's HTML;
        - a paragraph or such a list that grew since: its growing HTML, whose settled part is kept;
        - a fenced code block at the margin, closed: its lines escaped.
        Otherwise the chunk is rendered with its trailing blank lines (they are code inside a fence
        opened in a list item, "- ```")."""
        start = len(self._source)
        body = chunk.rstrip(" \n")
        last = self._last
        self._last = None
        if last is not None and last[0] == start and body == last[1]:
            return last[2]
        if _one_paragraph(body):
            return "<p>" + self._growing_inline(body, start) + "</p>\n"
        first = body[:1]
        if first in _LIST_MARKS and "`" not in chunk and "~" not in chunk \
                and (html := self._growing_list(body, start)) is not None:
            return html
        if first in "`~" and (html := _closed_fence_html(chunk)) is not None:
            return html
        return to_html(chunk)

    def _growing_list(self, text: str, start: int) -> str | None:
        """The HTML of `text`, the tail of the answer, when it is a tight list (`_list_items`): a list
        rendered whole for every frame costs its every item each time. Its finished items are rendered
        once and kept; the item being written, when it is one line, is a growing paragraph's inline HTML
        in `<li>` (a tight list shows its items' paragraphs without `<p>`). None: not such a list."""
        items = _list_items(text)
        if items is None:
            return None
        kept = self._list
        finished, html = (kept[1], kept[2]) if kept is not None and kept[0] == start else (0, "")
        if items[-1] > finished:
            more = self._finished_items(text, start, finished, items)
            if more is None:
                return None
            finished, html = items[-1], html + more
        self._list = (start, finished, html)
        item = text[finished:]
        marker = _ITEM.match(item)
        content = item[marker.end():] if marker is not None else item
        body = content.rstrip(" \n")
        last: str | None
        if not body:
            last = "<li></li>\n"
        elif _one_paragraph(body):  # (its further lines are indented: `_one_paragraph` refuses them)
            last = "<li>" + self._growing_inline(body, start + len(text) - len(content)) + "</li>\n"
        else:  # more than one line, or a block: the item rendered alone
            last = _items_html(item)
            if last is None:
                return None
        opening = _list_opening(text)
        return opening + html + last + ("</ul>\n" if opening == "<ul>\n" else "</ol>\n")

    def _finished_items(self, text: str, start: int, finished: int, items: list[int]) -> str | None:
        """The HTML of the items of `text` (a tight list, `_list_items`, from offset `start` of the answer)
        from `finished` to its last item. An item of one line that is one paragraph is its inline HTML
        in `<li>`, as it was while it was the last item (`_growing_inline` keeps its settled part): most
        items a model writes are such lines. From the first other item on, markdown-it renders the rest
        (None: it found something else in them)."""
        if finished not in items:  # cannot happen (an item's first line stays one as the text grows)
            return _items_html(text[finished:items[-1]])
        html = ""
        index = items.index(finished)
        for begin, end in zip(items[index:-1], items[index + 1:], strict=True):
            item = text[begin:end - 1]  # without its line break
            marker = _ITEM.match(item)
            content = item[marker.end():] if marker is not None else ""
            body = content.rstrip(" ")
            if "\n" in item or not _one_paragraph(body):
                more = _items_html(text[begin:items[-1]])
                return None if more is None else html + more
            html += "<li>" + self._growing_inline(body, start + end - 1 - len(content)) + "</li>\n"
        return html

    def _growing_inline(self, text: str, start: int) -> str:
        """The inline HTML of `text`, one paragraph's content (from offset `start` of the answer), being
        written at the end of the answer. Parsed whole for every frame, a paragraph written token by
        token would cost markdown-it's inline parse, ~17 µs plus ~0.5 µs a character, each time (400 µs
        a frame at 700 characters). Instead, as soon as something in it is not plain text, all of it but
        its last letter is settled if it is closed (`_cut`, `_inline_html`): parsed once, its HTML kept.
        What follows the settled part is most often plain text, which needs no parse at all."""
        kept = self._paragraph
        settled, html, retry = (kept[1], kept[2], kept[3]) if kept is not None and kept[0] == start else (0, "", 0)
        rest = text[settled:]
        plain = _plain(rest)
        if not plain and len(rest) >= retry and (cut := _cut(rest)):
            more, closed = _inline_html(rest[:cut])
            if closed:
                settled, html, rest, retry = settled + cut, html + more, rest[cut:], 0
                plain = _plain(rest)
            else:  # something opened in it is still open: try again once more has come
                retry = len(rest) + PARAGRAPH_STEP
        self._paragraph = (start, settled, html, retry)
        inline = rest.replace("\n", "<br />\n") if plain else _inline_html(rest)[0]
        return html + inline

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
