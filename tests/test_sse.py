"""The incremental SSE decoder: events split anywhere across network reads decode the same."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatgpt.upstream.sse import SSEDecoder

STREAM = (b'data: {"a": 1}\n\n: a comment\n\nevent: ping\ndata: {"b": 2}\n\n'
          b'data: first line\ndata: second line\n\nid: 7\nretry: 10\n\ndata:no-space\r\n\r\ndata: [DONE]\n\n')
PAYLOADS = [b'{"a": 1}', b'{"b": 2}', b"first line\nsecond line", b"no-space", b"[DONE]"]


def test_a_whole_stream_in_one_read_gives_every_payload_in_order() -> None:
    assert SSEDecoder().feed(STREAM) == PAYLOADS


@given(st.lists(st.integers(1, len(STREAM)), max_size=20))
def test_reads_split_at_any_byte_give_the_same_payloads(cuts: list[int]) -> None:
    decoder, payloads, start = SSEDecoder(), [], 0
    for cut in sorted(set(cuts)) + [len(STREAM)]:
        payloads += decoder.feed(STREAM[start:cut])
        start = cut
    assert payloads == PAYLOADS


def test_an_event_is_only_given_once_its_blank_line_arrived() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n') == []
    assert decoder.feed(b"\n") == [b'{"a": 1}']


def test_an_over_long_line_without_a_newline_is_refused() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_event_bytes=1000).feed(b"data: " + b"x" * 2000)


def test_an_over_long_event_made_of_many_lines_is_refused() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_event_bytes=1000).feed(b"data: " + b"x" * 600 + b"\ndata: " + b"y" * 600 + b"\n")


def test_plain_data_events_are_kept_verbatim_for_a_relay() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: {"c"') == [b'{"a": 1}', b'{"b": 2}']
    assert decoder.verbatim == b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
    assert decoder.feed(b': 3}\n\n') == [b'{"c": 3}']
    assert decoder.verbatim == b'data: {"c": 3}\n\n'


@pytest.mark.parametrize("stream", [b"data: a\n\n: keep-alive\n\n", b"data: a\ndata: b\n\n",
                                    b"data: a\n\n\ndata: b\n\n", b"data:a\n\n", b"event: x\ndata: a\n\n",
                                    b"data: a\r\n\r\n"])
def test_anything_but_plain_data_lines_is_not_offered_verbatim(stream: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(stream)
    assert decoder.verbatim is None


def test_an_over_long_event_arriving_whole_in_one_read_is_refused() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_event_bytes=1000).feed(b"data: " + b"x" * 2000 + b"\n\n")


@given(st.lists(st.sampled_from([b'data: {"a": 1}\n\n', b": keep-alive\n\n", b"data: one\ndata: two\n\n",
                                 b"data: [DONE]\n\n", b"event: x\ndata: y\n\n"]), max_size=12),
       st.lists(st.integers(1, 200), max_size=10))
def test_mixed_events_split_anywhere_decode_like_a_whole_read(events: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(events)
    expected = SSEDecoder().feed(stream)
    decoder, got, start = SSEDecoder(), [], 0
    for cut in sorted({c for c in cuts if c < len(stream)}) + [len(stream)]:
        got += decoder.feed(stream[start:cut])
        start = cut
    assert got == expected


@given(st.lists(st.sampled_from([b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", b": ping\n\n", b"data: x\ndata: y\n\n",
                                 b"data: \n\n", b"\n"]), max_size=12))
def test_verbatim_bytes_always_encode_exactly_the_payloads_returned(events: list[bytes]) -> None:
    decoder = SSEDecoder()
    payloads = decoder.feed(b"".join(events))
    if decoder.verbatim is not None:
        assert decoder.verbatim == b"".join(b"data: " + p + b"\n\n" for p in payloads)
