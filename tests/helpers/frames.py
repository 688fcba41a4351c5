"""The mini-program's side of the websocket: the question frame it sends, reading an answer's frames,
and waiting for the server to catch up."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientWebSocketResponse


def question(prompt: str = "你好", **fields: Any) -> dict[str, Any]:
    """A chat question as the mini-program sends it (anonymous user unless overridden)."""
    frame: dict[str, Any] = {
        "conversationId": "c-1", "id": "u-1", "parentId": 1, "authType": "api", "authValue": "Bearer ",
        "isDemo": True, "content": "", "isGenImg": False, "isSender": False,
        "messages": [{"role": "user", "content": prompt, "html": f"<p>{prompt}</p>", "isSend": True,
                      "createTime": "2026-11-24 08:00:00", "id": "u-1"}],
    }
    frame.update(fields)
    return frame


async def receive_answer(ws: ClientWebSocketResponse, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Frames up to and including the one with isDone true (each within `timeout` seconds)."""
    frames = []
    while True:
        async with asyncio.timeout(timeout):
            frame = await ws.receive_json()
        frames.append(frame)
        if frame.get("isDone"):
            return frames


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0, step: float = 0.02) -> None:
    """Poll until `condition()` holds (e.g. the server finished a closed socket's handler)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)
