"""JSON at the boundary: strict parsing of outside input, output that is always valid UTF-8 JSON."""
from __future__ import annotations

import json

import pytest

from chatgpt import jsontext


@pytest.mark.parametrize("raw", ["NaN", "[Infinity]", '{"a": -Infinity}', "1e999", "[" * 100_000 + "]" * 100_000,
                                 b'{"a": "\xff"}', "{'a': 1}", '{"a": 1} trailing', ""])
def test_what_a_browser_could_not_read_back_is_a_value_error(raw: str | bytes) -> None:
    with pytest.raises(ValueError):
        jsontext.parse(raw)


def test_a_lone_surrogate_escape_is_valid_json_and_parses() -> None:
    # A client that cuts text in the middle of an emoji sends this; it is still a question.
    assert jsontext.parse('{"content": "\\ud83d"}') == {"content": "\ud83d"}


def test_bytes_and_text_parse_alike_with_chinese_text() -> None:
    text = '{"content": "你好", "n": 1, "x": [true, null, 1.5]}'
    assert jsontext.parse(text) == jsontext.parse(text.encode()) == json.loads(text)


@pytest.mark.parametrize("value", [{"content": "你好"}, {"c": "\ud800 lone"}, {"big": 2**70}, {"a": [1, "b", None]}])
def test_output_is_utf8_json_that_reads_back_to_the_same_value(value: dict[str, object]) -> None:
    out = jsontext.dumpb(value)
    assert json.loads(out.decode("utf-8")) == value
    assert jsontext.dumps(value) == out.decode("utf-8")


def test_chinese_text_goes_out_readable_not_escaped() -> None:
    assert jsontext.dumps({"content": "你好"}) == '{"content":"你好"}'
