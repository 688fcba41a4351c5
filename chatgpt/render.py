"""Markdown to HTML for the `html` field of websocket frames; raw HTML from the model is escaped."""
from __future__ import annotations

from markdown_it import MarkdownIt

# html=False escapes any raw HTML the model writes instead of passing it to the client's
# rich-text view; markdown-it also refuses javascript:/vbscript:/data: links by default.
_md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])


def to_html(text: str) -> str:
    """Render one answer's Markdown to an HTML string."""
    return _md.render(text)
