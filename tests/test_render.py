"""Markdown rendering: raw HTML escaped, and the incremental renderer equal to a full render."""
from __future__ import annotations

import pytest
from collections.abc import Iterable, Iterator
from itertools import accumulate

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from chatgpt.faces import markdown
from chatgpt.faces.markdown import IncrementalRenderer, to_html

BLOCKS = ["# Heading", "Plain *words* here", "- a\n- b", "1. one\n2. two", "> quoted", "```py\nx = 1\n\ny = 2\n```",
          "~~~\n```\n~~~", "    indented code", "| a | b |\n|---|---|\n| 1 | 2 |", "***", "text\n===", "`code` and "
          "[link](https://example.com)", "<b>raw</b>", "  - nested\n    - deeper", "3) three",
          # A paragraph a list interrupts, lazy lines, lines that start with digits or odd whitespace,
          # a paragraph run that ends in a list, code fenced at the margin or inside an item.
          "para\n- item", "> quote\nlazy", "- item\nlazy", "2024 was\n2025 is", "\u3000wide\n\xa0space",
          "\t", "  indented para", "- a\n\n  ```\n  code\n  ```", "- ```", "```\n1. x\n```", "~~strike~~ and a | pipe",
          "*open emphasis", "closing* one", "a  \nhard break", "[x]: https://example.com", "[x] and &amp; \\*"]


def test_raw_html_from_the_model_is_escaped_not_passed_through() -> None:
    html = to_html("<script>alert(1)</script> <img src=x onerror=alert(1)>")
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_javascript_links_are_not_rendered_as_links() -> None:
    assert "href" not in to_html("[x](javascript:alert(1))")


# markdown-it as faces/markdown.py sets it up: the reference every shortcut must match.
_FULL = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])


def assert_frames_render_like_markdown_it(frames: Iterable[str], step: int | None = None) -> None:
    """One renderer given `frames` (a growing answer, as a socket sends it): each one's HTML is
    markdown-it's full render of it. `step`: the renderer's PARAGRAPH_STEP for the while."""
    renderer = IncrementalRenderer()
    with pytest.MonkeyPatch.context() as patch:
        if step is not None:
            patch.setattr(markdown, "PARAGRAPH_STEP", step)
        for text in frames:
            assert renderer.render(text) == _FULL.render(text), repr(text)


def growing(tokens: Iterable[str], start: str = "") -> Iterator[str]:
    """The text after each token, as a model streams it."""
    text = start
    for token in tokens:
        text += token
        yield text


def prefixes(doc: str, first: int = 1, step: int = 1) -> list[str]:
    """`doc` cut every `step` characters from `first` on, and whole."""
    return [doc[:end] for end in range(first, len(doc), step)] + [doc]


def test_every_prefix_of_a_growing_answer_renders_like_a_full_render() -> None:
    assert_frames_render_like_markdown_it(prefixes("\n\n".join(BLOCKS) + "\n\nthe end"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=12),
       st.lists(st.sampled_from(["\n\n", "\n", "\n\n\n"]), min_size=12, max_size=12),
       st.lists(st.integers(1, 40), min_size=1, max_size=200))
def test_any_sequence_of_blocks_and_frame_sizes_renders_like_a_full_render(
        blocks: list[str], gaps: list[str], steps: list[int]) -> None:
    doc = "".join(b + g for b, g in zip(blocks, gaps, strict=False))
    assert_frames_render_like_markdown_it([*(doc[:end] for end in accumulate(steps)), doc])


# Tokens as a model streams them: words with and without inline Markdown, line and paragraph breaks,
# list and quote markers, fences, indentation, digits at the start of a line.
_TOKENS = st.sampled_from(["Here", " is", " **bold**", " `code`", " *it", "alic*", " [a](https://x.y)", "\n", "\n\n",
                           "- ", "* ", "1. ", "2) ", "> ", "    ", "  ", "```", "```py\n", "~~~", "# ", "---", "===",
                           "| a |", "2024", " 你好", "，", "\\", "&amp;", " ", "\t", "<b>", "_x_", "~~s~~", "[x]",
                           "]: https://x.y", "  ```"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_TOKENS, min_size=1, max_size=60))
def test_a_streamed_answer_renders_like_a_full_render_after_every_token(tokens: list[str]) -> None:
    assert_frames_render_like_markdown_it(growing(tokens))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_TOKENS, min_size=1, max_size=16).map("".join))
def test_a_text_taken_for_one_paragraph_renders_exactly_as_markdown_it(text: str) -> None:
    assert to_html(text) == _FULL.render(text)


def test_text_that_does_not_extend_the_last_one_starts_over() -> None:
    renderer = IncrementalRenderer()
    renderer.render("# one\n\nfirst answer\n\nmore\n")
    assert renderer.render("something else") == to_html("something else")


_PLAIN_OR_NOT = st.text(alphabet=st.sampled_from(list(
    "ab 你，。\n#-+=:1.)*_`[]!<>&~\"|\t\\\u3000\xa0\x0b\x0c\u2028\u0085'$%@{}()/?😀\r")), min_size=1, max_size=14)


@settings(max_examples=3000)
@given(_PLAIN_OR_NOT)
def test_the_plain_paragraph_shortcut_renders_exactly_as_markdown_it(text: str) -> None:
    assert to_html(text) == _FULL.render(text)


def test_plain_lines_render_as_one_paragraph_with_breaks() -> None:
    assert to_html("你好，世界。\nSecond line 2") == "<p>你好，世界。<br />\nSecond line 2</p>\n"


# What a model writes inside one paragraph: words with and without spaces (CJK), emphasis, code spans
# and links opened in one token and closed tokens later, escapes, entities, intraword underscores,
# autolinks, single line breaks, trailing spaces.
_PARAGRAPH_TOKENS = st.sampled_from([
    " word", "word", " 你好", "世界", "，", "。", " **", "**", "*", "_", " _x", "y_", "`", " `a b", "c`", " [", "[link",
    "](https://x.y)", "]", "(", ")", "\\*", "\\", "&amp;", "&", "amp;", " <https://x.y>", "<", ">", "~~", "!", " ![i](",
    "\n", "  \n", " ", "2024", "snake_case", "a*b", "***", " `` ", "\u3000", "😀", "é", "\r", "\r\n",
])


# The settled prefix is extended once the unsettled part is PARAGRAPH_STEP long; a step of 1 tries a
# cut at every frame, so that a cut in every possible place is tried.
STEPS = [1, markdown.PARAGRAPH_STEP]


@pytest.mark.parametrize("step", STEPS)
@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(_PARAGRAPH_TOKENS, min_size=20, max_size=160))
def test_a_long_paragraph_streamed_token_by_token_renders_like_a_full_render(step: int, tokens: list[str]) -> None:
    assert_frames_render_like_markdown_it(growing(tokens, "Intro.\n\n"), step)


def test_a_long_paragraph_renders_like_a_full_render_when_an_emphasis_opened_early_closes_late() -> None:
    opened = "Start **" + " ".join(f"word{i}" for i in range(60))
    assert_frames_render_like_markdown_it(prefixes(opened + "** and *more* words " + "我们可以去公园" * 20))


# Without spaces (Chinese is written so) a paragraph is cut between letters: delimiters and entities
# right at such a cut would change meaning if the cut were allowed before or inside them.
_UNSPACED_TOKENS = st.sampled_from(["你好", "世界", "天气", "a", "b1", "_", "*", "**", "(", ")", "`", "&", "amp;", "&amp;",
                                    "[", "](https://x.y)", "~~", "\\", "，", "。", "\n", "<", ">"])


@pytest.mark.parametrize("step", STEPS)
@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(_UNSPACED_TOKENS, min_size=40, max_size=200))
def test_a_long_paragraph_without_spaces_renders_like_a_full_render(step: int, tokens: list[str]) -> None:
    assert_frames_render_like_markdown_it(growing(tokens), step)


# Cuts that would change the meaning of what is around them, were they allowed: after an underscore
# that closes only at the end of a text, before a star whose flanking depends on the letter before it,
# inside an entity, after an escape, around a code span's backticks, a link's brackets, an image.
TRICKY = ["中，_a_b中", "中 _a_a(中", "词 *(x)*词", "词a *(x)*", "文字&amp;文字", "文字&#42;x*文字", "a\\*b*c",
          "词`a`b词``c`", "词[a]b(c)词", "![a](b)词![c", "x**y**z**", "词~~a~~b~~", "词<a>b<https://x.y>词"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("tricky", TRICKY)
def test_every_prefix_of_a_long_paragraph_with_tricky_cuts_renders_like_a_full_render(step: int, tricky: str) -> None:
    assert_frames_render_like_markdown_it(prefixes("起" * 30 + tricky * 4 + "终" * 30), step)


# What a model writes in lists and code blocks: markers of every kind (and changes of kind), items
# nested, lazy or empty, thematic breaks, blank lines (a loose list), fences with info strings,
# closing fences indented or too short, tabs, raw HTML in code.
_LIST_AND_CODE_TOKENS = st.sampled_from([
    "- ", "* ", "+ ", "1. ", "2) ", "07. ", "-", "1.", "\n", "\n\n", "  ", "   ", "    ", "\t", "item", " word", " **b**",
    "`c`", " *open", "- - -", "---", "***", "lazy", "> q", "# h", "  - nested", "   1. deep", "```", "```py\n", "~~~",
    "~~~ js x\n", "```a`b\n", "``", "<b>&", " ", "  \n", "2024", "[x](y)",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(_LIST_AND_CODE_TOKENS, min_size=1, max_size=80))
def test_lists_and_code_blocks_streamed_token_by_token_render_like_a_full_render(tokens: list[str]) -> None:
    assert_frames_render_like_markdown_it(growing(tokens, "Intro.\n\n"))


LISTS_AND_CODE = ["- one **bold**\n- two `code`\n- three [link](https://x.y)", "3. three\n4. four\n5. five",
                  "* a\n  * nested\n    continued\n* b", "1) x\n2) y\n- other list", "- a\n- b\n\n- loose",
                  "- a\n\n  para in item\n- b", "- a\nlazy line\n- b", "- a\n - b\n  - c", "- a\n* b", "+ a\n+ - - -",
                  "```py\nx = 1\n\n    y = '<b>'\n```\nafter", "~~~~\n```\n~~~\n~~~~", "```\n  ```\nx", " ```\nindented fence",
                  "- ```\n  code\n  ```\n- b", "- a\n- - -\n- b", "* a\n* * *\n1. b\n2. c", "- a\n-\n- c",
                  "- a\n- b\n  \n- c", "- a\n \t\n- c", "- a\r\r\n- c", "- a\n\n\n- c",
                  "- a\n * b\n- c", "- - \n * ```py\n- ", "- a\n  - b\n\n  c\n- d",
                  "```a`b\n```\n\n- code, not a list",
                  # Blocks split off once the next one starts: a fence in an item keeps the blank lines after
                  # it as code; a closed fence at the margin, its closing line indented, too short or empty.
                  "- ```\n  foo\n\n\nNext", "- a\n  ```\n  code\n\nafter", "```\nx\n```\n\n\nafter",
                  "~~~~\ncode\n~~~\n~~~~\n\nafter", "```py\nx <b>\n  ```  \n\nafter", "```\n```\n\nafter",
                  "- a **b**\n- c `d`\n\n\n# next", "Para *x* y\n\n\n> next"]


@pytest.mark.parametrize("doc", LISTS_AND_CODE)
def test_every_prefix_of_a_list_or_code_block_renders_like_a_full_render(doc: str) -> None:
    assert_frames_render_like_markdown_it(prefixes("Intro.\n\n" + doc, first=9))


# Lines whose first characters may or may not open a block: a paragraph line that starts with
# emphasis, a hashtag, a number or a sign, beside headings, list markers, breaks and underlines.
_LINE_STARTS = st.sampled_from(["**B** x", "#tag", "# h", "###### h", "####### x", "#", "-5", "- x", "-", "--", "---",
                                "- - -", "+x", "+ x", "+", "*x*", "* x", "*", "***", "_i_", "___", "__b__ x", "3.14",
                                "3. x", "3.", "1)", "1)x", "=", "= x", "==", "`c` x", "```", "``", "~~s~~", "~~~", "x"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(_LINE_STARTS, min_size=1, max_size=5).map("\n".join))
def test_lines_that_may_start_a_block_render_exactly_as_markdown_it(text: str) -> None:
    assert to_html(text) == _FULL.render(text)
    assert_frames_render_like_markdown_it(["Intro.\n\n" + text])


@pytest.mark.parametrize("step", [1, 5, 17, 40])
def test_a_link_reference_definition_changes_links_before_and_after_it_whatever_the_frames(step: int) -> None:
    # A definition turns `[x]` into a link in every block, before it too: once "]:" has been seen
    # anywhere in a frame, every frame is rendered whole.
    doc = "Intro with [x] and [y].\n\n- item [x]\n\n[x]: https://x.y\n[y]: https://y.z 'title'\n\nmore [x] and [y] after\n\nend"
    assert_frames_render_like_markdown_it(prefixes(doc, first=step, step=step))


# Bold words and code spans as models write them, beside plain words, CJK, punctuation and line breaks,
# and what looks like them but is not (a star or a backtick too many, a space inside, an underscore, an
# empty pair).
_BOLD_TOKENS = st.sampled_from(["**", "**word**", " **two words**", "**粗体**", "**x1**", "word", " ", "你好", "，", "。",
                                ":", "(", ")", "!", "\n", "*", "***", "** ", " **", "__", "_", "2024", "a.b", "**$5**",
                                "`code`", " `a <b> & \"c\"`", "`", "``", "` x`", "`*a*`", "`\\`", "**`c`**", "\u2e3b"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_BOLD_TOKENS, min_size=1, max_size=14).map("".join))
def test_bold_words_and_code_spans_render_exactly_as_markdown_it(text: str) -> None:
    assert to_html(text) == _FULL.render(text)
    assert_frames_render_like_markdown_it(["Intro.\n\n" + text, "Intro.\n\n" + text + " end"])


def test_bold_words_and_code_spans_take_no_markdown_it_parse() -> None:
    assert markdown._simple_html("A **short** answer, **粗体**字 and x**y**z:\nnext") == \
        "A <strong>short</strong> answer, <strong>粗体</strong>字 and x<strong>y</strong>z:<br />\nnext"
    assert markdown._simple_html("Run **the `pip` tool** or `x < 1`.") == \
        "Run <strong>the <code>pip</code> tool</strong> or <code>x &lt; 1</code>."
    assert markdown._simple_html("**`pip`**") is None  # a star beside a backtick: flanking, for markdown-it
    assert markdown._simple_html("a ** b**") is None and markdown._simple_html("a **b* c") is None
    assert markdown._simple_html("a `` b") is None and markdown._simple_html("a ` b` c") is None
