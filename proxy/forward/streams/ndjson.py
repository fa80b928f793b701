"""Native NDJSON streams (``/api/generate``, ``/api/chat``): one JSON object per line.

Token lines are read by byte scan, not parsed. Ollama writes them with Go's ``encoding/json`` in struct
order (spec §3.3, §4.2), e.g.::

    {"model":"m","created_at":"…","response":"The","done":false}
    {"model":"m","created_at":"…","message":{"role":"assistant","content":"The"},"done":false}

An unescaped ``"key":"`` cannot occur inside a JSON string (every quote in a string is escaped), so the
first occurrence of the key is the field itself, provided no nested object could also hold that key. Only
``tool_calls`` arguments can, so a line with ``"tool_calls":`` is parsed in full. A line is scanned only
when it contains ``"done":false`` and no ``"error":``; everything else (done lines, errors, load/unload,
any layout we do not recognise) goes through ``orjson`` and is checked at the top level, so a nested key
cannot fool it.
"""

from __future__ import annotations

import orjson

from proxy.forward.streams.collect import string_end
from proxy.forward.streams.facts import Flavor
from proxy.forward.streams.lines import LineParser

__all__ = ["NdjsonParser"]

_DONE_FALSE = b'"done":false'
_ERROR = b'"error":'
_TOOL_CALLS = b'"tool_calls":'
_THINKING = b'"thinking":"'
_MODEL = b'"model":"'
_BACKSLASH = 0x5C
# How a token line ends after its text, per flavor (Go struct order, spec §3.3 / §4.2).
_TEXT_ENDS: dict[Flavor, bytes] = {
    Flavor.GENERATE: b'","done":false}',
    Flavor.OPENAI_COMPLETION: b'","done":false}',
    Flavor.CHAT: b'"},"done":false}',
    Flavor.OPENAI_CHAT: b'"},"done":false}',
}
_TEXT_KEYS: dict[Flavor, bytes] = {
    Flavor.GENERATE: b'"response":"',
    Flavor.OPENAI_COMPLETION: b'"response":"',  # never NDJSON in practice; same shape as generate if so
    Flavor.CHAT: b'"message":{"role":"assistant","content":"',
    Flavor.OPENAI_CHAT: b'"message":{"role":"assistant","content":"',
}


class NdjsonParser(LineParser):
    """Facts from a native NDJSON stream; see the module docstring for the fast path."""

    __slots__ = ("_end", "_endlen", "_fast_ok", "_key", "_keylen", "_line_end", "_model_tried")
    framing = "ndjson"

    def __init__(self, flavor: Flavor) -> None:
        super().__init__()
        self._key = _TEXT_KEYS.get(flavor, b"")  # empty: no fast path for this flavor
        self._keylen = len(self._key)
        self._end = _TEXT_ENDS.get(flavor, b"") + b"\n"
        self._endlen = len(self._end)
        self._line_end = self._end[:-1]  # the same ending inside a buffer of several lines (no newline)
        self._model_tried = False
        self._fast_ok = False  # set once the first line was read the long way (it names the model)

    def feed(self, chunk: bytes) -> int:
        """Read ``chunk``; the common case (one whole token line) is handled inline.

        That case is ``…"response":"<text>","done":false}\\n`` with no quote inside ``<text>``: a
        quote-free stretch between the key and the fixed line ending must be that one string, so the chunk
        holds exactly one line and nothing nested, and a handful of C calls suffice. Any other chunk (split
        lines, escaped quotes, thinking, tool calls, done, errors) goes through ``LineParser.feed``.
        """
        if self._fast_ok and not self._tail:
            e = len(chunk) - self._endlen
            p = chunk.find(self._key)
            if p >= 0 and chunk.startswith(self._end, e):
                q = p + self._keylen
                if q == e:
                    self._bytes += len(chunk)
                    return 0
                if q < e:
                    raw = chunk[q:e]
                    if raw.find(b'"') < 0 and raw[-1] != _BACKSLASH:
                        self._bytes += len(chunk)
                        c = self._c
                        c.text.append(raw)
                        c.events += 1
                        return 1
        return LineParser.feed(self, chunk)

    def _full(self, buf: bytes, start: int, end: int) -> int:
        try:
            obj = orjson.loads(buf[start:end])
        except orjson.JSONDecodeError:
            self._c.malformed += 1
            return 0
        return self._c.absorb_any(obj)

    def _line(self, buf: bytes, start: int, end: int) -> int:
        if self._fast_ok:
            # feed()'s fast path for one line of a read that held several (the relay hands over what one
            # socket read held, so under load a chunk is often a few token lines): same test, same result.
            e = end - self._endlen + 1
            p = buf.find(self._key, start, end)
            if p >= 0 and buf.startswith(self._line_end, e, end):
                q = p + self._keylen
                if q == e:
                    return 0
                if q < e and buf.find(b'"', q, e) < 0 and buf[e - 1] != _BACKSLASH:
                    c = self._c
                    c.text.append(buf[q:e])
                    c.events += 1
                    return 1
        if end > start and buf[end - 1] == 0x0D:  # tolerate \r\n
            end -= 1
        if start >= end:
            return 0
        key = self._key
        if (
            not key
            or buf.rfind(_DONE_FALSE, start, end) < 0
            or buf.find(_ERROR, start, end) >= 0
            or buf.find(_TOOL_CALLS, start, end) >= 0
        ):
            return self._full(buf, start, end)
        p = buf.find(key, start, end)
        if p < 0:
            return self._full(buf, start, end)
        q = p + self._keylen
        close = string_end(buf, q, end)
        if close < 0:
            return self._full(buf, start, end)
        tq = tclose = 0
        t = buf.find(_THINKING, close, end)
        if t >= 0:
            tq = t + 12
            tclose = string_end(buf, tq, end)
            if tclose < 0:
                return self._full(buf, start, end)
        if not self._model_tried:
            self._scan_model(buf, start, p)
        c = self._c
        got = 0
        if close > q:
            c.text.append(buf[q:close])
            got = 1
        if tclose > tq:
            c.thinking.append(buf[tq:tclose])
            got = 1
        c.events += got
        return got

    def _scan_model(self, buf: bytes, start: int, end: int) -> None:
        """Remember the model name from the first token line, so truncated streams still name it."""
        self._model_tried = True
        self._fast_ok = bool(self._key)
        m = buf.find(_MODEL, start, end)
        if m >= 0:
            close = string_end(buf, m + 9, end)
            if close >= 0:
                self._c.model_raw = buf[m + 9 : close]
