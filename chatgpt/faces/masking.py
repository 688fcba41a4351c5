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
    """An answer's text as the client may see it, fed delta by delta: `text()` is the text so far with listed
    words masked, `markdown()` the source its HTML is rendered from (None while nothing is masked: the text
    itself). Both are kept as parts (`GrowingMasker`), so a delta costs itself, not the whole answer."""

    def __init__(self, words: WordFilter | None) -> None:
        self._masker = words.growing((MASK, HIDDEN)) if words is not None else None
        self._plain: list[str] = []  # the parts without words to mask

    def feed(self, delta: str) -> None:
        """More of the answer."""
        if self._masker is None:
            self._plain.append(delta)
        else:
            self._masker.feed(delta)

    def text(self) -> str:
        """The whole answer so far, masked."""
        return "".join(self._plain if self._masker is None else self._masker.parts[0])

    def markdown(self) -> str | None:
        """The Markdown to render when it is not the text (something is masked)."""
        if self._masker is None or not self._masker.hits:
            return None
        return "".join(self._masker.parts[1])
