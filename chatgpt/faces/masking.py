"""Listed words masked in what a door sends (PROTOCOL.md E.5): a websocket answer's text and the HTML
rendered from it, and `/v1`'s chunks and whole answers."""
from __future__ import annotations

from typing import Any

from chatgpt import jsontext
from chatgpt.domain.provider import Delta
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
    """An answer's text (or its reasoning) as the client may see it, fed delta by delta and kept as parts
    that the frame writer joins only when a frame goes out: `parts`, the text with listed words masked,
    and `source`, the Markdown its html is rendered from (None without words to mask: the text itself).
    A delta costs itself and the held tail, never the whole answer (`GrowingMasker`)."""

    def __init__(self, words: WordFilter | None) -> None:
        self._masker = words.growing((MASK, HIDDEN)) if words is not None else None
        self.parts: list[str] = self._masker.parts[0] if self._masker is not None else []
        self.source: list[str] | None = self._masker.parts[1] if self._masker is not None else None

    def feed(self, delta: str) -> None:
        """More of the text."""
        if self._masker is None:
            self.parts.append(delta)
        else:
            self._masker.feed(delta)


def _reasoning_key(delta: dict[str, Any]) -> str:
    """Where the upstream puts reasoning in a delta: `reasoning_content` (DeepSeek...) or `reasoning`."""
    return "reasoning" if "reasoning" in delta and "reasoning_content" not in delta else "reasoning_content"


class ChunkMasker:
    """Streamed `/v1` with listed words: each upstream chunk re-encoded with its answer text and reasoning
    masked, holding back only a tail that could still become a word (the upstream's own bytes would
    carry the words). Logprobs are left out: they spell the text token by token."""

    def __init__(self, words: WordFilter) -> None:
        self._text = words.stream()
        self._reasoning = words.stream()
        self._key = "reasoning_content"

    def payload(self, delta: Delta) -> str | None:
        """The data of the event to send for `delta`, or None when nothing of it may go out yet."""
        if not (delta.text or delta.reasoning or delta.finish_reason):
            return delta.payload  # nothing to mask (the role, a tool call, the usage): as it came
        chunk = jsontext.parse(delta.payload)  # the provider parsed it: a JSON object
        choices = chunk.get("choices")
        choice: dict[str, Any] = choices[0] if isinstance(choices, list) and choices and \
            isinstance(choices[0], dict) else {}
        found = choice.get("delta")
        fields: dict[str, Any] = found if isinstance(found, dict) else {}
        if delta.reasoning:
            self._key = _reasoning_key(fields)
        reasoning = self._reasoning.feed(delta.reasoning) if delta.reasoning else ""
        if delta.text or delta.finish_reason:
            reasoning += self._reasoning.flush()  # the answer has begun: the reasoning is over
        text = self._text.feed(delta.text) if delta.text else ""
        if delta.finish_reason:
            text += self._text.flush()
        if not (text or reasoning or delta.finish_reason or delta.tool_call or delta.usage or "role" in fields):
            return None
        fields.pop("reasoning_content", None)
        fields.pop("reasoning", None)
        if reasoning:
            fields[self._key] = reasoning
        if text or delta.text or "content" in fields:
            fields["content"] = text
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None
        return jsontext.dumps(chunk)

    def text(self, text: str) -> str:
        """Answer text of a provider without chunks of its own (offline, Baixing): what may go out now."""
        return self._text.feed(text)

    def rest(self) -> dict[str, str]:
        """The end of the stream without a finish chunk: what is still held, as a delta object."""
        rest = {self._key: self._reasoning.flush(), "content": self._text.flush()}
        return {k: v for k, v in rest.items() if v}


def mask_completion(whole: dict[str, Any], words: WordFilter) -> dict[str, Any]:
    """A non-streamed `chat.completion` with listed words masked in its text and reasoning."""
    for choice in whole.get("choices") or []:
        message = choice.get("message") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(message.get(key), str):
                message[key] = words.mask(message[key])
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None
    return whole
