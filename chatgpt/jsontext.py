"""JSON across the boundary: what comes in is checked, what goes out is always valid UTF-8 JSON."""
from __future__ import annotations

import json
import math
from typing import Any


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large for JSON")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for the process: json.loads with hooks would build a new decoder on every call, and
# this runs for every upstream chunk.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def parse(raw: str | bytes) -> Any:
    """`json.loads` for outside input. Every way it can be bad is a ValueError: absurd nesting
    (RecursionError), bad UTF-8, and NaN/Infinity/1e999, which the client's JSON.parse could not
    read back if we echoed them."""
    try:
        return _decoder.decode(raw if isinstance(raw, str) else raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(value: Any) -> str:
    """Compact JSON keeping Chinese text readable; strings with lone surrogates (valid in JSON
    escapes, not in UTF-8) fall back to ASCII escapes instead of failing to encode."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return text
