"""HTTP answers being streamed, so that a shutdown ends each with an error event instead of cutting it."""
from __future__ import annotations

import asyncio


class InFlight:
    """The tasks streaming `/v1` and `/chat` answers right now."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self.stopping = False

    def enter(self) -> None:
        """The current task starts streaming an answer."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)

    def leave(self) -> None:
        """The current task's answer has ended."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)

    def stop_all(self) -> int:
        """At shutdown: cancel every stream; each one ends its answer with an error event."""
        self.stopping = True
        for task in self._tasks:
            task.cancel()
        return len(self._tasks)
