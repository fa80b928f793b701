"""Named SSE events (``event: <type>`` + ``data: <json>`` + blank line): the framing of ``/v1/messages`` and
``/v1/responses`` (spec §8.7).

The base class only frames: ``LineParser`` hands it whole lines whatever the chunking, it gathers the
``event:`` name and the ``data:`` lines (joined with ``\\n`` as the SSE standard says; ``\\r\\n`` tolerated)
and hands each finished event to ``_event(name, data)``. ``id:``, ``retry:`` and ``:`` comments carry
nothing recorded. A last event whose blank line never came is still dispatched at the end of the body.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.forward.streams.lines import LineParser

__all__ = ["EventStreamParser"]

_DATA = b"data:"
_EVENT = b"event:"


def _field(buf: bytes, start: int, end: int, skip: int) -> bytes:
    s = start + skip
    if s < end and buf[s] == 0x20:
        s += 1
    return buf[s:end]


class EventStreamParser(LineParser):
    """Base class: subclasses implement ``_event(name, data)`` and return the content events it carried."""

    __slots__ = ("_data", "_name")
    framing = "sse"

    def __init__(self) -> None:
        super().__init__()
        self._data: bytes | None = None
        self._name = b""

    def _event(self, name: bytes, data: bytes) -> int:
        raise NotImplementedError

    def _full_event(self, data: bytes) -> int:
        """An event the byte scan did not take: parsed whole and handed to ``_full`` (malformed ones counted)."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._c.malformed += 1
            return 0
        if not isinstance(obj, dict):
            self._c.malformed += 1
            return 0
        return self._full(obj)

    def _full(self, obj: dict[str, Any]) -> int:
        raise NotImplementedError

    def _line(self, buf: bytes, start: int, end: int) -> int:
        if end > start and buf[end - 1] == 0x0D:
            end -= 1
        if start == end:
            data, name = self._data, self._name
            self._data, self._name = None, b""
            return 0 if data is None else self._event(name, data)
        if buf.startswith(_DATA, start, end):
            piece = _field(buf, start, end, 5)
            self._data = piece if self._data is None else self._data + b"\n" + piece
        elif buf.startswith(_EVENT, start, end):
            self._name = _field(buf, start, end, 6)
        return 0

    def _flush(self) -> None:
        super()._flush()
        if self._data is not None:
            data, name = self._data, self._name
            self._data, self._name = None, b""
            self._event(name, data)
