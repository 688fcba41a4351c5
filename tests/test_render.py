"""Markdown rendering: raw HTML escaped, and the incremental renderer equal to a full render."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from chatgpt.faces.markdown import IncrementalRenderer, to_html

BLOCKS = ["# Heading", "Plain *words* here", "- a\n- b", "1. one\n2. two", "> quoted", "```py\nx = 1\n\ny = 2\n```",
          "~~~\n```\n~~~", "    indented code", "| a | b |\n|---|---|\n| 1 | 2 |", "***", "text\n===", "`code` and "
          "[link](https://example.com)", "<b>raw</b>", "  - nested\n    - deeper", "3) three"]


def test_raw_html_from_the_model_is_escaped_not_passed_through() -> None:
    html = to_html("<script>alert(1)</script> <img src=x onerror=alert(1)>")
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_javascript_links_are_not_rendered_as_links() -> None:
    assert "href" not in to_html("[x](javascript:alert(1))")


def test_every_prefix_of_a_growing_answer_renders_like_a_full_render() -> None:
    doc = "\n\n".join(BLOCKS) + "\n\nthe end"
    renderer = IncrementalRenderer()
    for end in range(1, len(doc) + 1):
        assert renderer.render(doc[:end]) == to_html(doc[:end]), repr(doc[:end][-30:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=12),
       st.lists(st.sampled_from(["\n\n", "\n", "\n\n\n"]), min_size=12, max_size=12),
       st.lists(st.integers(1, 40), min_size=1, max_size=200))
def test_any_sequence_of_blocks_and_frame_sizes_renders_like_a_full_render(
        blocks: list[str], gaps: list[str], steps: list[int]) -> None:
    doc = "".join(b + g for b, g in zip(blocks, gaps, strict=False))
    renderer, end = IncrementalRenderer(), 0
    for step in steps:
        end = min(len(doc), end + step)
        assert renderer.render(doc[:end]) == to_html(doc[:end])
    assert renderer.render(doc) == to_html(doc)


def test_text_that_does_not_extend_the_last_one_starts_over() -> None:
    renderer = IncrementalRenderer()
    renderer.render("# one\n\nfirst answer\n\nmore\n")
    assert renderer.render("something else") == to_html("something else")


# markdown-it as faces/markdown.py sets it up: the reference the shortcut must match.
_FULL = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])
_PLAIN_OR_NOT = st.text(alphabet=st.sampled_from(list(
    "ab 你，。\n#-+=:1.)*_`[]!<>&~\"|\t\\\u3000\xa0\x0b\x0c\u2028\u0085'$%@{}()/?😀")), min_size=1, max_size=14)


@settings(max_examples=3000)
@given(_PLAIN_OR_NOT)
def test_the_plain_paragraph_shortcut_renders_exactly_as_markdown_it(text: str) -> None:
    assert to_html(text) == _FULL.render(text)


def test_plain_lines_render_as_one_paragraph_with_breaks() -> None:
    assert to_html("你好，世界。\nSecond line 2") == "<p>你好，世界。<br />\nSecond line 2</p>\n"
