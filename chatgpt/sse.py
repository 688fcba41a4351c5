"""An incremental `text/event-stream` decoder: bytes in as they arrive, whole event payloads out."""
from __future__ import annotations

MAX_EVENT_BYTES = 1024 * 1024  # one chat chunk is a few hundred bytes; a 1 MiB event is an attack or a bug


class SSEDecoder:
    """Feeds raw bytes and returns the `data` payloads of the events they complete.

    Everything a network read delivered is decoded in one call, so a caller can relay one batch
    per read instead of paying the async machinery once per line. Only `data:` fields matter for
    OpenAI streams; `event:`, `id:`, `retry:` and comments are skipped (and nothing reconnects)."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[str]:
        """Decode `chunk`; raise ValueError for an over-long event or a payload that is not UTF-8."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._data and b"\r" not in buffer:
            fast = self._single_line_events(buffer)
            if fast is not None:
                return fast
        return self._lines(buffer)

    def _single_line_events(self, buffer: bytes) -> list[str] | None:
        """The common case, decoded without a per-line loop: every complete event in the buffer is
        one `data: ` line. None sends anything else (comments, multi-line events) to `_lines`."""
        events = buffer.split(b"\n\n")
        rest = events.pop()
        if b"\n" in rest.rstrip(b"\n") or len(rest) > self._max:
            return None
        payloads = []
        for event in events:
            if not event.startswith(b"data: ") or b"\n" in event or len(event) > self._max:
                return None
            payloads.append(event[6:])
        self._buffer = rest
        return [p.decode("utf-8") for p in payloads]

    def _lines(self, buffer: bytes) -> list[str]:
        """The general line-by-line decoder of the event-stream format."""
        payloads: list[str] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    payloads.append(b"\n".join(self._data).decode("utf-8"))
                    self._data, self._size = [], 0
            elif line.startswith(b"data:"):
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                self._size += len(value)
                if self._size > self._max:
                    raise ValueError("an upstream event is larger than the limit")
                self._data.append(value)
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise ValueError("an upstream line is longer than the limit")
        return payloads
