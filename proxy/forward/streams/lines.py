"""Line splitting shared by the NDJSON and SSE parsers: chunk boundaries never reach the line handlers.

Complete lines inside a chunk are handed over as ``(chunk, start, end)`` without slicing; only a line that
straddles chunks is copied, once, out of a small tail buffer. So the facts cannot depend on where the
transport split the bytes, and the common case (one line per chunk, as Ollama flushes) copies nothing.
"""

from __future__ import annotations

from proxy.forward.streams.collect import Collector
from proxy.forward.streams.facts import StreamFacts

__all__ = ["LineParser"]


class LineParser:
    """Base class: subclasses implement ``_line`` and say their ``framing``."""

    __slots__ = ("_bytes", "_c", "_facts", "_tail")
    framing = "other"

    def __init__(self) -> None:
        self._c = Collector()
        self._tail = bytearray()
        self._bytes = 0
        self._facts: StreamFacts | None = None

    def _line(self, buf: bytes, start: int, end: int) -> int:
        """Handle ``buf[start:end]`` (no newline); return content events completed by it."""
        raise NotImplementedError

    def _fast(self, chunk: bytes) -> int:
        """The common case, a chunk that is exactly one token line/event: events, or -1 to decline."""
        return -1

    def feed(self, chunk: bytes) -> int:
        """Read ``chunk`` (never modified); return how many content events completed in it."""
        self._bytes += len(chunk)
        if not self._tail:
            got = self._fast(chunk)
            if got >= 0:
                return got
        nl = chunk.find(b"\n")
        if nl < 0:
            self._tail += chunk
            return 0
        if self._tail:
            self._tail += chunk[:nl]
            line = bytes(self._tail)
            self._tail.clear()
            events = self._line(line, 0, len(line))
        else:
            events = self._line(chunk, 0, nl)
        start = nl + 1
        find = chunk.find
        nl = find(b"\n", start)
        while nl >= 0:
            events += self._line(chunk, start, nl)
            start = nl + 1
            nl = find(b"\n", start)
        if start < len(chunk):
            self._tail += chunk[start:]
        return events

    def _flush(self) -> None:
        """End of body: a trailing line without its newline still counts."""
        if self._tail:
            line = bytes(self._tail)
            self._tail.clear()
            self._line(line, 0, len(line))

    def finish(self) -> StreamFacts:
        """Flush the tail and decode; idempotent (a second call returns the same facts)."""
        if self._facts is None:
            self._flush()
            self._facts = self._c.facts(self.framing, self._bytes)
        return self._facts
