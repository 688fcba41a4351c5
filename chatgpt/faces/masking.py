"""Listed words masked in a websocket answer's text and in the HTML rendered from it (PROTOCOL.md E.5)."""
from __future__ import annotations

from chatgpt.domain.wordfilter import MASK, WordFilter

# In the Markdown source, a masked character is this private-use character rather than `*`: it means
# nothing to Markdown anywhere (a run of `*` would become emphasis, and a `\*` escape shows its backslash
# inside code), and it becomes `*` in the rendered HTML. A link target percent-encodes it.
HIDDEN = "\ue000"
_HIDDEN_IN_URL = "%EE%80%80"


def unhide(html: str) -> str:
    """Rendered HTML with each masked character shown as `*`."""
    if HIDDEN in html:
        html = html.replace(HIDDEN, MASK)
    if _HIDDEN_IN_URL in html:
        html = html.replace(_HIDDEN_IN_URL, MASK)
    return html


class ShownText:
    """An answer's cumulative text as the client may see it: `update` gives the text with listed words
    masked, and the Markdown source its HTML is rendered from (None when it is the text itself)."""

    def __init__(self, words: WordFilter | None) -> None:
        self._text = words.cumulative() if words is not None else None
        self._source = words.cumulative(HIDDEN) if words is not None else None

    def update(self, text: str) -> tuple[str, str | None]:
        """The whole answer so far, masked; and the Markdown to render when it differs from the text."""
        if self._text is None or self._source is None:
            return text, None
        shown = self._text.update(text)
        if not self._text.hits:
            return shown, None
        return shown, self._source.update(text)
