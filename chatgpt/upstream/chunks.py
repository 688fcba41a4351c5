"""What one OpenAI-compatible event says, checked without trusting its shape:
answer text, reasoning (`reasoning_content` as DeepSeek, Qwen, Ark and SiliconFlow send it, `reasoning`
as OpenRouter does), tool calls, usage (top level, or in `choices[0]` as Kimi sends it)."""
from __future__ import annotations

from typing import Any

from chatgpt import jsontext
from chatgpt.domain.errors import UpstreamBroken, UpstreamError
from chatgpt.domain.provider import Delta, Usage


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(value: Any) -> Usage | None:
    """An OpenAI `usage` object as our Usage; None when there is none."""
    if not isinstance(value, dict):
        return None
    details = value.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(_count(value.get("prompt_tokens")), _count(value.get("completion_tokens")), _count(reasoning))


def _error_in(data: dict[str, Any], host: str) -> None:
    """An error reported in place of an answer (some upstreams do this with HTTP 200)."""
    if isinstance(data.get("error"), (dict, str)):
        raise UpstreamError(500, jsontext.dumpb(data), host=host)


def delta_of(host: str, payload: str) -> Delta:
    """The Delta of one `chat.completion.chunk` event whose data is `payload` (`host` first, so that
    `partial(delta_of, host)` binds it without a keyword merged on every event)."""
    try:
        data = jsontext.parse(payload)
    except ValueError:
        raise UpstreamBroken(f"The upstream {host} sent an event that is not JSON.") from None
    if not isinstance(data, dict):
        raise UpstreamBroken(f"The upstream {host} sent an event that is not a JSON object.")
    text = reasoning = ""
    finish = None
    tool_call = False
    usage = None
    try:  # the shape of nearly every chunk: one try instead of a check per level
        choice = data["choices"][0]
        delta = choice["delta"]
        text = delta.get("content") or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        tool_call = bool(delta.get("tool_calls") or delta.get("function_call"))
        finish = choice.get("finish_reason")
        if "usage" in choice:
            usage = usage_of(choice["usage"])
    except (KeyError, IndexError, TypeError, AttributeError):
        _error_in(data, host)
    if data.get("usage") is not None:
        usage = usage_of(data["usage"]) or usage
    answer_id = data.get("id")
    return Delta(text if type(text) is str else "", reasoning if type(reasoning) is str else "", tool_call, usage,
                 payload, finish if type(finish) is str else None, answer_id if type(answer_id) is str else "")
