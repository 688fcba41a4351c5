"""A faithful /v1 (PROTOCOL.md E.2): every request field the server does not own reaches the upstream,
answers carry what the upstream's carry (tool calls, usage, logprobs), the SDK's function calling and
JSON mode work streamed and not, and tokens are counted."""
from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CLIENT_TOKEN, USER_KEY, MakeClient
from tests.fakes.openai import FakeOpenAI, Stream
from tests.test_operations import scrape, value

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_abc123", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}


def sdk(client: TestClient, key: str = CLIENT_TOKEN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0)


async def test_every_field_the_server_does_not_own_reaches_the_upstream(client: TestClient,
                                                                        fake: FakeOpenAI) -> None:
    fields: dict[str, Any] = {
        "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False,
        "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 2,
        "logit_bias": {"50256": -100}, "seed": 7, "stop": ["\n\n"], "user": "u-42", "reasoning_effort": "low",
        "metadata": {"run": "1"}, "top_p": 0.5, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "some_future_field": {"kept": True}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}], "name": "alice"},
        {"role": "assistant", "content": None, "reasoning_content": "I need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]
    response = await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": messages, "n": 1, "max_completion_tokens": 100, **fields},
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert response.status == 200, await response.text()
    sent = fake.chat_requests()[0].body
    assert {k: sent[k] for k in fields} == fields
    assert sent["messages"] == messages
    assert sent["max_completion_tokens"] == 100 and "max_tokens" not in sent
    assert "n" not in sent and sent["stream"] is True


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_on_the_servers_keys_the_token_limit_is_capped_under_the_name_the_caller_used(
        make_client: MakeClient, fake: FakeOpenAI, field: str) -> None:
    client = await make_client(upstream={"max_tokens": 300})
    response = await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], field: 5000})
    assert response.status == 200
    sent = fake.chat_requests()[0].body
    assert sent[field] == 300
    assert {"max_tokens", "max_completion_tokens"} - {field} - set(sent) == {
        "max_tokens", "max_completion_tokens"} - {field}


async def test_on_the_callers_own_key_nothing_is_capped_or_added(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50000},
        headers={"Authorization": f"Bearer {USER_KEY}"})
    assert response.status == 200
    sent = fake.chat_requests()[0].body
    assert sent == {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50000,
                    "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_sdk_function_calling_works(client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    fake.script.append(Stream(pieces=[], tool_calls=[CALL]))
    api = sdk(client)
    try:
        if stream:
            chunks = [c async for c in await api.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=[WEATHER], stream=True)]  # type: ignore[list-item]
            calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
            assert [(t.index, t.id, t.function.name if t.function else None) for t in calls][0] == (
                0, "call_abc123", "get_weather")
            assert "".join(t.function.arguments or "" for t in calls if t.function) == CALL["arguments"]
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        else:
            answer = await api.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=[WEATHER])  # type: ignore[list-item]
            [call] = answer.choices[0].message.tool_calls or []
            assert (call.id, call.function.name, json.loads(call.function.arguments)) == (  # type: ignore[union-attr]
                "call_abc123", "get_weather", {"city": "Paris", "unit": "celsius"})
            assert answer.choices[0].finish_reason == "tool_calls"
    finally:
        await api.close()
    assert fake.chat_requests()[0].body["tools"] == [WEATHER]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_sdk_json_mode_works(client: TestClient, fake: FakeOpenAI, stream: bool) -> None:
    fake.script.append(Stream(pieces=['{"answer":', ' 42}']))
    api = sdk(client)
    try:
        if stream:
            chunks = [c async for c in await api.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "JSON please"}],
                response_format={"type": "json_object"}, stream=True)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = await api.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "JSON please"}],
                response_format={"type": "json_object"})
            text = answer.choices[0].message.content or ""
    finally:
        await api.close()
    assert json.loads(text) == {"answer": 42}
    assert fake.chat_requests()[0].body["response_format"] == {"type": "json_object"}


async def test_a_non_streamed_answer_carries_usage_and_logprobs(client: TestClient, fake: FakeOpenAI) -> None:
    api = sdk(client)
    try:
        answer = await api.chat.completions.create(model="gpt-3.5-turbo", logprobs=True,
                                                   messages=[{"role": "user", "content": "Hi"}])
    finally:
        await api.close()
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (9, 12)
    assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
    assert [t.token for t in answer.choices[0].logprobs.content] == ["Hello", ", ", "**world**", "!"]


async def test_the_usage_chunk_reaches_only_a_caller_that_asked_for_it(client: TestClient,
                                                                       fake: FakeOpenAI) -> None:
    api = sdk(client)
    try:
        plain = [c async for c in await api.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}], stream=True)]
        asked = [c async for c in await api.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}], stream=True,
            stream_options={"include_usage": True})]
    finally:
        await api.close()
    # The server asks the upstream for the usage either way (it counts tokens).
    assert [r.body["stream_options"] for r in fake.chat_requests()] == [{"include_usage": True}] * 2
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert (asked[-1].usage.prompt_tokens, asked[-1].usage.completion_tokens) == (9, 12)


async def test_an_upstream_set_not_to_report_usage_is_not_asked(make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(upstream={"usage": False})
    response = await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")
    assert "stream_options" not in fake.chat_requests()[0].body


async def test_tokens_are_counted_by_kind_payer_and_model_also_from_kimis_usage(
        client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.append(Stream(usage={"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
                                     "completion_tokens_details": {"reasoning_tokens": 25}}))
    kimi = Stream(usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, usage_in_choice=True)
    fake.script.append(kimi)
    for headers in ({}, {"Authorization": f"Bearer {USER_KEY}"}):
        response = await client.post("/v1/chat/completions", headers=headers, json={
            "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
        assert response.status == 200
        await response.read()
    _, samples = await scrape(client)
    name, up = "chatgpt_tokens_total", "default"  # the one upstream of the `upstream:` shorthand
    assert value(samples, name, kind="prompt", payer="pool", model="gpt-3.5-turbo", upstream=up) == 100
    assert value(samples, name, kind="completion", payer="pool", model="gpt-3.5-turbo", upstream=up) == 40
    assert value(samples, name, kind="reasoning", payer="pool", model="gpt-3.5-turbo", upstream=up) == 25
    assert value(samples, name, kind="prompt", payer="own", model="gpt-3.5-turbo", upstream=up) == 7
    assert value(samples, name, kind="completion", payer="own", model="gpt-3.5-turbo", upstream=up) == 3


async def test_an_own_key_model_that_is_not_offered_is_labelled_other(client: TestClient, fake: FakeOpenAI) -> None:
    response = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {USER_KEY}"}, json={
        "model": "my-fine-tune-" + "x" * 200, "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status == 200
    _, samples = await scrape(client)
    assert value(samples, "chatgpt_tokens_total", kind="prompt", payer="own", model="other", upstream="default") == 9


async def test_an_answer_without_an_upstream_id_gets_a_minted_one(client: TestClient, fake: FakeOpenAI) -> None:
    fake.script.extend([Stream(answer_id=None), Stream(answer_id=None)])
    plain = await (await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]})).json()
    assert plain["id"].startswith("chatcmpl-") and len(plain["id"]) > len("chatcmpl-")
    assert plain["choices"][0]["message"]["content"] == "Hello, **world**!"
    raw = await (await client.post("/v1/chat/completions", json={
        "model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], "stream": True})).read()
    assert raw.endswith(b"data: [DONE]\n\n")  # relayed as the upstream sent it: its chunks have no id
