"""A non-streamed `/v1` answer: one `chat.completion` assembled from the upstream's streamed chunks.

The upstream is always asked to stream, so that every door has the same timeouts (the longest wait
for the next event, comments are not progress) and the same fall-over before the first event. The
chunks are merged the way the OpenAI SDK merges them: strings joined, objects merged, tool-call
fragments joined by their `index`, logprobs lists appended; fields this server does not know are
merged the same way, so they reach the caller too."""
from __future__ import annotations

import copy
from typing import Any

from chatgpt import jsontext
from chatgpt.domain.answer import new_answer_id
from chatgpt.domain.provider import Delta

# Values that name a thing rather than add text to it: the first one stays (some compatible servers
# repeat `role` or a tool call's `id` and `name` in every fragment).
_NAMES = frozenset({"role", "index", "type", "id", "name"})
_LAST = ("created", "model", "system_fingerprint", "service_tier")  # top-level fields: the last one sent


def merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Merge one delta object into what came before it."""
    for key, value in delta.items():
        current = into.get(key)
        if value is None:
            into.setdefault(key, None)
        elif current is None:
            into[key] = copy.deepcopy(value)
        elif key in _NAMES:
            continue
        elif isinstance(current, str) and isinstance(value, str):
            into[key] = current + value
        elif isinstance(current, dict) and isinstance(value, dict):
            merge(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            if key == "tool_calls":
                _merge_calls(current, value)
            else:
                current.extend(copy.deepcopy(value))
        else:
            into[key] = value


def _merge_calls(calls: list[Any], fragments: list[Any]) -> None:
    """Tool-call fragments: the first of a call brings its index, id and name, the rest its arguments."""
    for fragment in fragments:
        if not isinstance(fragment, dict):
            continue
        index = fragment.get("index")
        call = next((c for c in calls if isinstance(c, dict) and c.get("index") == index), None)
        if call is None and index is None and calls and not fragment.get("id"):
            call = calls[-1]  # a server that leaves out `index`: the call being built
        if call is None:
            calls.append(copy.deepcopy(fragment))
        else:
            merge(call, fragment)


class Completion:
    """Collects the deltas of one answer into a `chat.completion` object."""

    def __init__(self) -> None:
        self._top: dict[str, Any] = {}
        self._message: dict[str, Any] = {}
        self._logprobs: dict[str, Any] | None = None
        self._finish: str | None = None
        self._usage: Any = None
        self._text: list[str] = []  # a provider without OpenAI chunks (offline, Baixing)

    def add(self, delta: Delta) -> None:
        """Take one delta: its chunk when it has one, else its text."""
        if not delta.payload:
            self._text.append(delta.text)
            self._finish = delta.finish_reason or self._finish
            self._top.setdefault("id", delta.answer_id)
            return
        chunk = jsontext.parse(delta.payload)  # parsed before by the provider: a JSON object
        if chunk.get("id") and "id" not in self._top:
            self._top["id"] = chunk["id"]
        self._top.update((k, chunk[k]) for k in _LAST if chunk.get(k) is not None)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        if isinstance(choice.get("delta"), dict):
            merge(self._message, choice["delta"])
        if isinstance(choice.get("logprobs"), dict):
            self._logprobs = self._logprobs or {}
            merge(self._logprobs, choice["logprobs"])
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]
        if isinstance(choice.get("usage"), dict):  # Kimi puts it in the choice
            self._usage = choice["usage"]

    def answer(self, model: str, created: int) -> dict[str, Any]:
        """The whole answer; the upstream's id (or a minted one), model and time when it sent them."""
        message = {"role": "assistant", **self._message}
        message["role"] = message["role"] or "assistant"
        if self._text:
            message["content"] = "".join(self._text)
        elif not message.get("content"):
            message["content"] = None if message.get("tool_calls") else ""
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                call.pop("index", None)  # a streaming detail: a whole answer lists its calls in order
        whole: dict[str, Any] = {"id": self._top.get("id") or new_answer_id(), "object": "chat.completion",
                                 "created": self._top.get("created", created), "model": self._top.get("model", model),
                                 "choices": [{"index": 0, "message": message, "logprobs": self._logprobs,
                                              "finish_reason": self._finish or "stop"}]}
        whole.update((k, self._top[k]) for k in ("system_fingerprint", "service_tier") if k in self._top)
        if self._usage is not None:
            whole["usage"] = self._usage
        return whole
