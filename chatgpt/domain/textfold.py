"""Text as word matching sees it: each character compatibility-decomposed and case-folded."""
from __future__ import annotations

import unicodedata

# Per-character normal forms. Normalising character by character (never across a delta boundary) is
# what makes streaming give the same result as the whole text. NFKD rather than NFKC: decomposition is
# local to one character, so "ｶﾞ" (two half-width characters) and "ガ" (one) both become "カ" + U+3099,
# whereas NFKC of each character alone would keep them different. Two strings are NFKC-equal exactly
# when they are NFKD-equal, so matching is the same as "NFKC + casefold" on the whole text.
_NORMS: dict[str, str] = {}
_NORMS_MAX = 1 << 16  # hostile text could carry every code point: the cache is cleared, never grows past this


def normalize_char(char: str) -> str:
    """One character as matching sees it: compatibility-decomposed and case-folded (may be 0..n chars)."""
    norm = _NORMS.get(char)
    if norm is None:
        norm = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", char).casefold())
        if len(_NORMS) >= _NORMS_MAX:
            _NORMS.clear()
        _NORMS[char] = norm
    return norm


def normalize(text: str) -> str:
    """A whole text as matching sees it (the per-character forms, concatenated)."""
    return "".join(normalize_char(c) for c in text)
