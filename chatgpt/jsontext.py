"""JSON from outside (clients, upstreams, files): every way it can be bad is one ValueError."""
from __future__ import annotations

import json
from typing import Any


def parse(raw: str | bytes) -> Any:
    """`json.loads`, except that absurd nesting (RecursionError) and bad UTF-8 are ValueErrors too."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
