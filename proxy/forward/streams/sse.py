"""OpenAI-compatible SSE streams (``/v1/chat/completions``, ``/v1/completions``).

Events are ``data: <json>`` lines ended by a blank line (spec §8.3, §8.4); ``\\r\\n`` is tolerated and
multi-line ``data`` is joined with ``\\n`` as the SSE standard says. Token chunks are read by byte scan::

    data: {…,"choices":[{"index":0,"delta":{"content":"The"},"finish_reason":null}]}
    data: {…,"choices":[{"text":"The","index":0,"finish_reason":null}],…}

A chunk is parsed in full when it carries a non-null ``finish_reason``, ``tool_calls``, an ``error`` or a
non-zero ``usage`` (every /v1/completions chunk carries an all-zero usage with include_usage, §8.4), or when
its layout is not the one expected. ``data: [DONE]`` is the only clean end: a mid-stream upstream error
shows up as an empty content chunk and then the stream stops without ``[DONE]`` (§8.3), which leaves
``complete`` false.
"""

from __future__ import annotations

import orjson

from proxy.forward.streams.collect import string_end
from proxy.forward.streams.facts import Flavor
from proxy.forward.streams.lines import LineParser

__all__ = ["SseParser"]

_DONE = b"[DONE]"
_DATA = b"data:"
_FINISH = b'"finish_reason":"'
_ERROR = b'"error":'
_TOOL_CALLS = b'"tool_calls":'
_USAGE = b'"usage":'
_ZERO_USAGE = b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
_NULL_USAGE = b'"usage":null'
_DELTA = b'"delta":{'
_CONTENT = b'"content":"'
_REASONING = b'"reasoning":"'
_CMPL_TEXT = b'"choices":[{"text":"'
_CMPL_END = b'","index":0,"finish_reason":null}]'
_CHAT_END = b'"},"finish_reason":null}]}\n\n'  # 28 bytes, after the content string's last byte
_MODEL = b'"model":"'
_CHAT, _COMPLETION = 1, 2
_MODES = {Flavor.OPENAI_CHAT: _CHAT, Flavor.OPENAI_COMPLETION: _COMPLETION}


def _has_usage(data: bytes) -> bool:
    u = data.find(_USAGE)
    return u >= 0 and not data.startswith(_ZERO_USAGE, u) and not data.startswith(_NULL_USAGE, u)


class SseParser(LineParser):
    """Facts from an SSE stream; see the module docstring for the fast path."""

    __slots__ = ("_data", "_fast_ok", "_mode", "_model_tried")
    framing = "sse"

    def __init__(self, flavor: Flavor) -> None:
        super().__init__()
        self._mode = _MODES.get(flavor, 0)
        self._data: bytes | None = None
        self._model_tried = False
        self._fast_ok = False  # set once the first event was read the long way (it names the model)

    def feed(self, chunk: bytes) -> int:
        """Read ``chunk``; the common case (one whole token event) is handled inline.

        Chat: ``data: {…"content":"<text>"},"finish_reason":null}]}\\n\\n``; completion: ``…{"text":"<text>",
        "index":0,"finish_reason":null}],…}\\n\\n`` with at most the all-zero usage. A quote-free ``<text>``
        up to the fixed continuation is exactly that one string. Anything else takes ``LineParser.feed``.
        """
        if self._fast_ok and not self._tail and self._data is None:
            mode = self._mode
            if mode == _CHAT:
                e = len(chunk) - 28
                p = chunk.find(_CONTENT)
                if p >= 0 and chunk.startswith(_CHAT_END, e):
                    q = p + 11
                    if q == e:
                        self._bytes += len(chunk)
                        return 0
                    if q < e and chunk.find(b'"', q, e) < 0 and chunk[e - 1] != 0x5C:
                        self._bytes += len(chunk)
                        c = self._c
                        c.text.append(chunk[q:e])
                        c.events += 1
                        return 1
            elif mode == _COMPLETION:
                p = chunk.find(_CMPL_TEXT)
                e = chunk.find(_CMPL_END, p)
                if (
                    p >= 0
                    and e >= 0
                    and chunk.find(b"\n", e) == len(chunk) - 2
                    and chunk.endswith(b"\n\n")
                    and not _has_usage(chunk)
                ):
                    q = p + 20
                    if q == e:
                        self._bytes += len(chunk)
                        return 0
                    if q < e and chunk.find(b'"', q, e) < 0 and chunk[e - 1] != 0x5C:
                        self._bytes += len(chunk)
                        c = self._c
                        c.text.append(chunk[q:e])
                        c.events += 1
                        return 1
        return LineParser.feed(self, chunk)

    def _line(self, buf: bytes, start: int, end: int) -> int:
        if end > start and buf[end - 1] == 0x0D:
            end -= 1
        if start == end:
            data = self._data
            if data is None:
                return 0
            self._data = None
            return self._event(data)
        if buf.startswith(_DATA, start, end):
            s = start + 5
            if s < end and buf[s] == 0x20:
                s += 1
            piece = buf[s:end]
            self._data = piece if self._data is None else self._data + b"\n" + piece
        # event:, id:, retry: and ":" comments carry nothing we record
        return 0

    def _flush(self) -> None:
        super()._flush()
        if self._data is not None:  # a last event whose blank line never came
            data, self._data = self._data, None
            self._event(data)

    def _full(self, data: bytes) -> int:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._c.malformed += 1
            return 0
        return self._c.absorb_any(obj)

    def _event(self, data: bytes) -> int:
        if not data:
            return 0
        if data == _DONE:
            self._c.terminal = True
            return 0
        mode = self._mode
        if (
            not mode
            or data.find(_FINISH) >= 0
            or data.find(_ERROR) >= 0
            or data.find(_TOOL_CALLS) >= 0
            or _has_usage(data)
        ):
            return self._full(data)
        if not self._model_tried:
            self._scan_model(data)
        c = self._c
        if mode == _COMPLETION:
            p = data.find(_CMPL_TEXT)
            if p < 0:
                return self._full(data)
            q = p + 20
            close = string_end(data, q, len(data))
            if close < 0:
                return self._full(data)
            if close == q:
                return 0
            c.text.append(data[q:close])
            c.events += 1
            return 1
        d = data.find(_DELTA)
        if d < 0:
            return self._full(data)
        n = len(data)
        cq = cclose = rq = rclose = 0
        ci = data.find(_CONTENT, d)
        if ci >= 0:
            cq = ci + 11
            cclose = string_end(data, cq, n)
        ri = data.find(_REASONING, d)
        if ri >= 0:
            rq = ri + 13
            rclose = string_end(data, rq, n)
        if (ci < 0 and ri < 0) or cclose < 0 or rclose < 0:
            return self._full(data)
        got = 0
        if rclose > rq:
            c.thinking.append(data[rq:rclose])
            got = 1
        if cclose > cq:
            c.text.append(data[cq:cclose])
            got = 1
        c.events += got
        return got

    def _scan_model(self, data: bytes) -> None:
        """Remember the model from the first chunk, so a stream cut before its finish chunk names it."""
        self._model_tried = True
        self._fast_ok = self._mode != 0
        m = data.find(_MODEL)
        if m >= 0:
            close = string_end(data, m + 9, len(data))
            if close >= 0:
                self._c.model_raw = data[m + 9 : close]
