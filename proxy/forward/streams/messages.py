"""The Anthropic Messages API (``/v1/messages``): its SSE stream and its JSON body (spec §8.7).

Stream (Ollama's ``anthropic.StreamConverter``, Go struct order)::

    event: message_start         {"type":"message_start","message":{…,"model":"m","usage":{"input_tokens":E,…}}}
    event: content_block_start   {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}
    event: content_block_delta   {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}
    event: content_block_stop    {"type":"content_block_stop","index":0}
    event: message_delta         {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{…}}
    event: message_stop          {"type":"message_stop"}

A content event is a ``content_block_delta`` with non-empty ``text``, ``thinking`` or ``partial_json`` (tool
arguments), or a ``content_block_start`` that already holds text. ``tool_use`` blocks count as tool calls.
Tokens come from ``message_delta``'s usage: Ollama's ``message_start`` usage is only its len/4 estimate
of the request (the real count exists at the end), so it is used only as the prompt count when a
``message_delta`` carries ``output_tokens`` alone (Anthropic's own shape). ``message_stop`` is the only clean
end; an ``error`` event (``{"type":"error","error":{"type","message"}}``) is the stream's error.

The token deltas, nearly every event, are read by byte scan: the data must be exactly
``{"type":"content_block_delta","index":<digits>,"delta":{"type":"text_delta","text":"<string>"}}`` (or
the thinking / input_json equivalent), checked end to end, so nothing nested can fool it; any other event
is parsed with ``orjson``. Which path an event takes depends only on its bytes, never on chunking.
"""

from __future__ import annotations

from typing import Any

from proxy.forward.streams.collect import Collector, string_end
from proxy.forward.streams.events import EventStreamParser

__all__ = ["MessagesParser", "absorb_message_body"]

_DELTA_HEAD = b'{"type":"content_block_delta","index":'
_TEXT = b',"delta":{"type":"text_delta","text":"'
_THINKING = b',"delta":{"type":"thinking_delta","thinking":"'
_JSON = b',"delta":{"type":"input_json_delta","partial_json":"'
_TAIL = b'"}}'
_TOOL_BLOCKS = ("tool_use", "server_tool_use")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _block(c: Collector, block: Any) -> bool:
    """A content block (a body's, or a ``content_block_start``'s); True when it carried content."""
    if not isinstance(block, dict):
        return False
    kind = block.get("type")
    if kind in _TOOL_BLOCKS:
        c.tool_calls += 1
        c.add_tool(block.get("name"))
        c.add_tool(block.get("input"))  # a body's whole input; a stream's start holds {} (deltas follow)
        return False
    got = c._add(c.text, block.get("text")) if kind == "text" else False
    return c._add(c.thinking, block.get("thinking")) if kind == "thinking" else got


def absorb_message_body(c: Collector, obj: Any) -> None:
    """A non-streamed ``/v1/messages`` body: a ``message``, or ``{"type":"error","error":{…}}``."""
    if not isinstance(obj, dict):
        return
    if obj.get("type") == "error" or obj.get("error") is not None:
        c.set_error(obj.get("error") or "error")
        return
    if isinstance(obj.get("model"), str):
        c.model = obj["model"]
    content = obj.get("content")
    got = False
    for block in content if isinstance(content, list) else ():
        got = _block(c, block) or got
        if isinstance(block, dict) and block.get("type") in _TOOL_BLOCKS:
            got = True
    if got:
        c.events += 1
    reason = obj.get("stop_reason")
    c.done_reason = reason if isinstance(reason, str) else None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        c.usage_prompt, c.usage_completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    c.final = {k: v for k, v in obj.items() if k != "content"}


class MessagesParser(EventStreamParser):
    """Facts from a ``/v1/messages`` event stream; see the module docstring."""

    __slots__ = ("_start_input",)

    def __init__(self) -> None:
        super().__init__()
        self._start_input: int | None = None  # message_start's input_tokens (an estimate on Ollama)

    def _event(self, name: bytes, data: bytes) -> int:
        if data.startswith(_DELTA_HEAD) and data.endswith(_TAIL):
            got = self._scan_delta(data)
            if got >= 0:
                return got
        return self._full_event(data)

    def _scan_delta(self, data: bytes) -> int:
        """Events in a token delta read by byte scan, or -1 when its layout is not the expected one."""
        head = len(_DELTA_HEAD)
        for key, target in ((_TEXT, 0), (_THINKING, 1), (_JSON, 2)):
            p = data.find(key, head)
            if p < 0:
                continue
            if p == head or not data[head:p].isdigit():
                return -1
            q = p + len(key)
            if string_end(data, q, len(data)) != len(data) - 3:
                return -1
            if q == len(data) - 3:
                return 0
            c = self._c
            if target == 0:
                c.text.append(data[q:-3])
            elif target == 1:
                c.thinking.append(data[q:-3])
            else:
                c.tools.append(data[q:-3])
            c.events += 1
            return 1
        return -1

    def _full(self, obj: dict[str, Any]) -> int:
        c = self._c
        kind = obj.get("type")
        got = False
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                got = c._add(c.text, delta.get("text")) if delta.get("type") == "text_delta" else False
                if delta.get("type") == "thinking_delta":
                    got = c._add(c.thinking, delta.get("thinking"))
                elif delta.get("type") == "input_json_delta":
                    partial = delta.get("partial_json")
                    got = c._add(c.tools, partial)
        elif kind == "content_block_start":
            got = _block(c, obj.get("content_block"))
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    c.model = message["model"]
                usage = message.get("usage")
                if isinstance(usage, dict):
                    self._start_input = _int(usage.get("input_tokens"))
        elif kind == "message_delta":
            self._message_delta(obj)
        elif kind == "message_stop":
            c.terminal = True
        elif kind == "error" or obj.get("error") is not None:
            c.set_error(obj.get("error") or "error")
        if got:
            c.events += 1
        return int(got)

    def _message_delta(self, obj: dict[str, Any]) -> None:
        c = self._c
        delta = obj.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
            c.done_reason = delta["stop_reason"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            output = _int(usage.get("output_tokens"))
            if output is not None:
                given = _int(usage.get("input_tokens"))
                c.usage_prompt = given if given is not None else self._start_input
                c.usage_completion = output
        c.final = obj
