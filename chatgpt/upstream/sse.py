"""An incremental `text/event-stream` decoder: bytes in as they arrive, whole event payloads out."""
from __future__ import annotations

MAX_EVENT_BYTES = 1024 * 1024  # one chat chunk is a few hundred bytes; a 1 MiB event is an attack or a bug
_NEXT_EVENT = b"\n\ndata: "


class SSEDecoder:
    """Feeds raw bytes and returns the `data` payloads of the events they complete, as bytes (the
    JSON parser that reads them next checks their UTF-8).

    Everything a network read delivered is decoded in one call, so a caller can relay one batch
    per read instead of paying the async machinery once per line. Only `data:` fields matter for
    OpenAI streams; `event:`, `id:`, `retry:` and comments are skipped (and nothing reconnects).

    After each `feed`, `verbatim` holds the exact bytes of the events just decoded when every one of
    them was a plain `data: <payload>` line (as OpenAI sends them): writing those bytes is the same
    as re-encoding the payloads, so a relay can pass them on untouched. Otherwise it is None."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._size = 0
        self._max = max_event_bytes
        self.verbatim: bytes | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Decode `chunk`; raise ValueError for an over-long event or line."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if not self._data and b"\r" not in buffer:
            fast = self._single_line_events(buffer)
            if fast is not None:
                return fast
        self.verbatim = None
        return self._lines(buffer)

    def _single_line_events(self, buffer: bytes) -> list[bytes] | None:
        """The common case, decoded without a per-line loop: every complete event in the buffer is
        one `data: ` line. None sends anything else (comments, multi-line events) to `_lines`."""
        end = buffer.rfind(b"\n\n") + 2
        events, rest = buffer[:end], buffer[end:]
        if b"\n" in rest.rstrip(b"\n") or len(rest) > self._max:
            return None
        if not events:
            self._buffer, self.verbatim = rest, b""
            return []
        if not events.startswith(b"data: "):
            return None
        payloads = events[6:-2].split(_NEXT_EVENT)
        # Each separator holds two newlines and the last event ends with two: any other newline
        # is inside an event (a second line, a comment, a blank line too many), which this path
        # does not decode.
        if events.count(b"\n") != 2 * len(payloads) or max(map(len, payloads)) > self._max:
            return None
        self._buffer, self.verbatim = rest, events
        return payloads

    def _lines(self, buffer: bytes) -> list[bytes]:
        """The general line-by-line decoder of the event-stream format."""
        payloads: list[bytes] = []
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
                    payloads.append(b"\n".join(self._data))
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
