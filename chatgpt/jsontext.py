"""JSON across the boundary: what comes in is checked, what goes out is always valid UTF-8 JSON.

orjson does the work: every upstream chunk and every websocket frame passes through here, and it
parses a chat chunk in a third of the standard library's time. The standard library stays as the
fallback for the valid JSON orjson refuses (lone surrogate escapes, which a client that cuts text
in the middle of an emoji sends) and to name the exact error."""
from __future__ import annotations

import json
import math
from typing import Any

import orjson


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large for JSON")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for the process: json.loads with hooks would build a new decoder on every call.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def parse(raw: str | bytes) -> Any:
    """`json.loads` for outside input. Every way it can be bad is a ValueError: absurd nesting,
    bad UTF-8, and NaN/Infinity/1e999, which the client's JSON.parse could not read back if we
    echoed them. (orjson refuses all of these too; its error is a ValueError.)"""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return _decoder.decode(raw if isinstance(raw, str) else raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(value: Any) -> str:
    """Compact JSON keeping Chinese text readable; strings with lone surrogates (valid in JSON
    escapes, not in UTF-8) fall back to ASCII escapes instead of failing to encode."""
    return dumpb(value).decode("utf-8")


def dumpb(value: Any) -> bytes:
    """`dumps` as UTF-8 bytes, for what goes straight onto a socket."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # orjson refuses lone surrogates, integers beyond 64 bits and non-string keys; the
        # standard library writes them all (ASCII escapes keep lone surrogates encodable).
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")
