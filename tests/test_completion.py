"""A non-streamed /v1 answer assembled from streamed chunks, as the OpenAI SDK assembles them."""
from __future__ import annotations

import json
from typing import Any

from chatgpt.domain.provider import Delta
from chatgpt.faces.completion import Completion


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **top: Any) -> Delta:
    data: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
                            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
                            **top}
    return Delta(payload=json.dumps(data))


def assemble(*deltas: Delta) -> dict[str, Any]:
    completion = Completion()
    for delta in deltas:
        completion.add(delta)
    return completion.answer("asked-model", 99)


def test_text_reasoning_usage_and_unknown_fields_are_joined() -> None:
    whole = assemble(
        chunk({"role": "assistant", "content": None, "reasoning_content": "Think"}),
        chunk({"content": None, "reasoning_content": "ing."}),
        chunk({"content": "Hel", "x_vendor": "a"}), chunk({"content": "lo", "x_vendor": "b"}),
        chunk({}, "stop", system_fingerprint="fp_1"),
        chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}))
    assert whole == {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello",
                                                          "reasoning_content": "Thinking.", "x_vendor": "ab"},
                                  "logprobs": None, "finish_reason": "stop"}],
                     "system_fingerprint": "fp_1", "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                             "total_tokens": 7}}


def test_tool_call_fragments_become_whole_calls_even_when_a_server_repeats_names() -> None:
    whole = assemble(
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                    "function": {"name": "f", "arguments": ""}}]}),
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"arguments": " 1}"}}]}),
        chunk({}, "tool_calls"))
    message = whole["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    assert whole["choices"][0]["finish_reason"] == "tool_calls"


def test_logprobs_lists_are_appended_and_kimis_usage_is_taken_from_the_choice() -> None:
    first = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    second = {"token": "!", "logprob": -0.2, "bytes": [33], "top_logprobs": []}
    kimi = json.dumps({"id": "k", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                              "usage": {"prompt_tokens": 1, "completion_tokens": 2}}]})
    deltas = [Delta(payload=json.dumps({"id": "k", "choices": [{"index": 0, "delta": {"content": t["token"]},
                                                                 "logprobs": {"content": [t]}}]}))
              for t in (first, second)]
    whole = assemble(*deltas, Delta(payload=kimi))
    assert whole["choices"][0]["logprobs"] == {"content": [first, second]}
    assert whole["usage"] == {"prompt_tokens": 1, "completion_tokens": 2}
    assert (whole["id"], whole["created"], whole["model"]) == ("k", 99, "asked-model")


def test_a_provider_without_chunks_gets_its_text_and_its_id_or_a_minted_one() -> None:
    whole = assemble(Delta("Off", answer_id="chatcmpl-offline-1"), Delta("line"), Delta(finish_reason="stop"))
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Offline"}
    assert whole["id"] == "chatcmpl-offline-1"
    minted = assemble(Delta("x"))["id"]
    assert minted.startswith("chatcmpl-") and minted != assemble(Delta("y"))["id"]
