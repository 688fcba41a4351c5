"""The mini-program's flat JSON envelope: status, msg, timestamp and the endpoint's fields."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from chatgpt import jsontext
from chatgpt.domain import texts

OK = "000000"


def envelope(status: str = OK, msg: str = texts.SUCCESS, **fields: Any) -> dict[str, Any]:
    """Build one envelope; fields that are None are left out, as the client expects."""
    body: dict[str, Any] = {"status": status, "msg": msg, "timestamp": int(time.time() * 1000)}
    body.update((k, v) for k, v in fields.items() if v is not None)
    return body


def envelope_response(status: str = OK, msg: str = texts.SUCCESS, **fields: Any) -> web.Response:
    """An envelope as an HTTP 200 JSON answer: the client ignores HTTP status codes."""
    text = jsontext.dumps(envelope(status, msg, **fields))
    return web.Response(text=text, content_type="application/json")
