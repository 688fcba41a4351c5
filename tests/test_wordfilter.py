"""Sensitive words (PROTOCOL.md E.5): matching, masking whole texts, and streaming split across deltas."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgpt.domain.wordfilter import WordFilter, WordListError, normalize

WORDS = ["fuck", "坏蛋", "ab", "bc", "ｶﾞ", "ss"]


def test_a_listed_word_is_found_whatever_its_case_or_width() -> None:
    words = WordFilter(["Fuck", "坏蛋"])
    assert words.contains("well FＵcK it")
    assert words.contains("ｆｕｃｋ")
    assert words.contains("你这个坏蛋!")
    assert not words.contains("fuc k")
    assert not words.contains("坏 蛋")
    assert not words.contains("")


def test_masking_replaces_exactly_the_original_characters_of_each_word() -> None:
    words = WordFilter(WORDS)
    assert words.mask("I say FＵcK you, 坏蛋!") == "I say **** you, **!"
    # overlapping words mask their union; a word made of decomposed characters masks both originals
    assert words.mask("abc") == "***"
    assert words.mask("ｶﾞ and ガ") == "** and *"
    # one original character that folds into two ("ß" -> "ss") is masked as one star
    assert words.mask("Maß") == "Ma*"
    assert words.mask("nothing here") == "nothing here"


def test_an_empty_list_changes_nothing_and_holds_nothing_back() -> None:
    words = WordFilter(["", "   "])
    assert words.size == 0
    masker = words.stream()
    assert masker.feed("abc") == "abc"
    assert masker.flush() == ""
    assert words.cumulative().update("abc") == "abc"


def test_the_words_file_ignores_blank_lines_and_surrounding_spaces(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("\ufeff  坏蛋  \n\n   \nFuck\r\n", encoding="utf-8")
    words = WordFilter.from_file(path)
    assert words.size == 2
    assert words.mask("坏蛋 fuck") == "** ****"


def test_an_unreadable_or_non_utf8_words_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(WordListError, match=r"words\.txt: not UTF-8"):
        WordFilter.from_file(path)
    with pytest.raises(WordListError, match="cannot read"):
        WordFilter.from_file(tmp_path / "missing.txt")


def test_streamed_http_holds_back_only_what_could_still_become_a_word() -> None:
    masker = WordFilter(WORDS).stream()
    assert masker.feed("hello f") == "hello "
    assert masker.held == "f"
    assert masker.feed("u") == ""
    assert masker.feed("ck!") == "****!"
    assert masker.hits == 1
    assert masker.feed("fun") == "fun"  # "fun" can no longer become "fuck"
    assert masker.feed(" a") == " "
    assert masker.flush() == "a"
    assert masker.flush() == ""


def test_the_websocket_masker_masks_a_word_the_moment_it_completes() -> None:
    masker = WordFilter(WORDS).cumulative()
    assert masker.update("你这个坏") == "你这个坏"
    assert masker.hits == 0
    assert masker.update("你这个坏蛋") == "你这个**"
    assert masker.hits == 1
    assert masker.update("你这个坏蛋啊") == "你这个**啊"
    # a text that does not extend the previous one is scanned afresh
    assert masker.update("坏蛋") == "**"


def test_refuse_mode_sees_the_word_complete_across_deltas() -> None:
    masker = WordFilter(["坏蛋"]).stream()
    masker.feed("你这个坏")
    assert masker.hits == 0
    masker.feed("蛋")
    assert masker.hits == 1


# Property: for any split of any text into deltas, streaming equals masking the whole text, and no
# prefix of what was sent ever contains a listed word. A small alphabet (with case and width
# variants of the same letters) makes words, overlaps and near-misses frequent.
ALPHABET = "abAB ａｂ坏蛋ßsS"
word_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=6)
texts = st.text(alphabet=ALPHABET, max_size=60)


def split(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the given positions (sorted, deduplicated)."""
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(text)]:
        pieces.append(text[last:point])
        last = point
    return pieces


def no_word_in(words: list[str], text: str) -> bool:
    """No normalised listed word occurs in the normalised text."""
    normal = normalize(text)
    return not any(normalize(w.strip()) and normalize(w.strip()) in normal for w in words)


@settings(max_examples=400, deadline=None)
@given(word_lists, texts, st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_streamed_http_equals_masking_the_whole_text_and_never_sends_a_word(
        words: list[str], text: str, cuts: list[int]) -> None:
    listed = WordFilter(words)
    masker = listed.stream()
    sent = ""
    for piece in split(text, cuts):
        sent += masker.feed(piece)
        assert no_word_in(words, sent)
    sent += masker.flush()
    assert sent == listed.mask(text)
    assert no_word_in(words, sent)
    assert len(sent) == len(text)


@settings(max_examples=400, deadline=None)
@given(word_lists, texts, st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_websocket_frames_equal_masking_each_prefix(words: list[str], text: str, cuts: list[int]) -> None:
    listed = WordFilter(words)
    masker = listed.cumulative()
    so_far = ""
    for piece in split(text, cuts):
        so_far += piece
        frame = masker.update(so_far)
        assert frame == listed.mask(so_far)
        assert no_word_in(words, frame)


@settings(max_examples=200, deadline=None)
@given(word_lists, texts)
def test_contains_agrees_with_the_normalised_text(words: list[str], text: str) -> None:
    assert WordFilter(words).contains(text) == (not no_word_in(words, text))


def test_markdown_source_can_carry_the_masks_as_escaped_stars() -> None:
    words = WordFilter(["坏蛋"])
    assert words.mask("**坏蛋**", star="\\*") == "**\\*\\***"
    masker = words.cumulative(star="\\*")
    masker.update("坏")
    assert masker.update("坏蛋 ok") == "\\*\\* ok"


@settings(max_examples=400, deadline=None)
@given(word_lists, texts, st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_growing_parts_equal_masking_each_prefix_in_every_rendering(
        words: list[str], text: str, cuts: list[int]) -> None:
    listed = WordFilter(words)
    masker = listed.growing(("*", "#"))
    so_far = ""
    for piece in split(text, cuts):
        so_far += piece
        masker.feed(piece)
        shown, source = ("".join(parts) for parts in masker.parts)
        assert shown == listed.mask(so_far)
        assert source == listed.mask(so_far, star="#")
        assert no_word_in(words, shown)
