"""The OpenAI Responses API (``/v1/responses``): its SSE stream and its JSON body (spec §8.7).

Stream events are ``event: <type>`` + ``data: <json>``. Ollama builds the data as Go ``map[string]any``, so
keys are sorted, e.g.::

    {"content_index":0,"delta":"Hi","item_id":"msg_1","logprobs":[],"output_index":0,"sequence_number":4,"type":"response.output_text.delta"}
    {"delta":"Let","item_id":"rs_1","output_index":0,"sequence_number":3,"summary_index":0,"type":"response.reasoning_summary_text.delta"}

Content events are ``response.output_text.delta`` (text), ``response.reasoning_summary_text.delta`` and
``response.reasoning_text.delta`` (thinking) and ``response.function_call_arguments.delta`` (tool
arguments) with a non-empty ``delta``; a ``function_call`` output item counts as a tool call. The terminal
events are ``response.completed`` and ``response.incomplete`` (``usage {input_tokens, output_tokens}``,
``status`` as ``done_reason``; for ``incomplete`` its ``incomplete_details.reason`` when given) and
``response.failed`` (``response.error`` is the error); a top-level ``error`` event is an error too. A
stream without a terminal event is not complete.

Deltas in Ollama's sorted layout are read by byte scan: the data starts with ``{"content_index":<digits>,
"delta":"`` or ``{"delta":"`` (so that string is the top-level ``delta``) and ends with
``"type":"<delta type>"}`` (so that is the top-level ``type``); anything else is parsed with ``orjson``.
"""

from __future__ import annotations

from typing import Any

from proxy.forward.streams.collect import Collector, string_end
from proxy.forward.streams.events import EventStreamParser

__all__ = ["ResponsesParser", "absorb_response_body"]

_CONTENT_INDEX = b'{"content_index":'
_DELTA_KEY = b',"delta":"'
_DELTA_FIRST = b'{"delta":"'
_TEXT_END = b'"type":"response.output_text.delta"}'
_THINKING_ENDS = (
    b'"type":"response.reasoning_summary_text.delta"}',
    b'"type":"response.reasoning_text.delta"}',
)
_ARGS_END = b'"type":"response.function_call_arguments.delta"}'
_TEXT, _THINK, _ARGS = 0, 1, 2
_THINK_TYPES = ("response.reasoning_summary_text.delta", "response.reasoning_text.delta")
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(c: Collector, usage: Any) -> None:
    if isinstance(usage, dict):
        c.usage_prompt, c.usage_completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))


def _status(c: Collector, response: dict[str, Any]) -> None:
    status = response.get("status")
    if not isinstance(status, str):
        return
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    c.done_reason = reason if status == "incomplete" and isinstance(reason, str) else status


def _small(response: dict[str, Any]) -> dict[str, Any]:
    """The terminal response for metadata: no output (text), no instructions, no tool schemas."""
    return {k: v for k, v in response.items() if k not in ("output", "instructions", "tools")}


def absorb_response_body(c: Collector, obj: Any) -> None:
    """A non-streamed ``/v1/responses`` body: a ``response`` object, or the OpenAI error envelope."""
    if not isinstance(obj, dict):
        return
    if obj.get("object") != "response":
        if obj.get("error") is not None:
            c.set_error(obj["error"])
        return
    if isinstance(obj.get("model"), str):
        c.model = obj["model"]
    got = False
    output = obj.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            content = item.get("content")
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict) and part.get("type") == "output_text":
                    got = c._add(c.text, part.get("text")) or got
        elif kind == "reasoning":
            summary = item.get("summary")
            for part in summary if isinstance(summary, list) else ():
                if isinstance(part, dict):
                    got = c._add(c.thinking, part.get("text")) or got
        elif kind == "function_call":
            c.tool_calls += 1
            c.add_tool(item.get("name"))
            c.add_tool(item.get("arguments"))
            got = True
    if got:
        c.events += 1
    _status(c, obj)
    _usage(c, obj.get("usage"))
    if obj.get("error") is not None:
        c.set_error(obj["error"])
    c.final = _small(obj)


class ResponsesParser(EventStreamParser):
    """Facts from a ``/v1/responses`` event stream; see the module docstring."""

    __slots__ = ()

    def _event(self, name: bytes, data: bytes) -> int:
        got = self._scan_delta(data)
        if got >= 0:
            return got
        return self._full_event(data)

    def _scan_delta(self, data: bytes) -> int:
        """Events in a delta in Ollama's sorted layout read by byte scan, or -1 to parse it in full."""
        if data.startswith(_DELTA_FIRST):
            q = len(_DELTA_FIRST)
        elif data.startswith(_CONTENT_INDEX):
            p = data.find(_DELTA_KEY, len(_CONTENT_INDEX))
            if p <= len(_CONTENT_INDEX) or not data[len(_CONTENT_INDEX) : p].isdigit():
                return -1
            q = p + len(_DELTA_KEY)
        else:
            return -1
        if data.endswith(_TEXT_END):
            target = _TEXT
        elif data.endswith(_THINKING_ENDS):
            target = _THINK
        elif data.endswith(_ARGS_END):
            target = _ARGS
        else:
            return -1
        close = string_end(data, q, len(data))
        if close < 0:
            return -1
        if close == q:
            return 0
        c = self._c
        if target == _TEXT:
            c.text.append(data[q:close])
        elif target == _THINK:
            c.thinking.append(data[q:close])
        else:
            c.tools.append(data[q:close])
        c.events += 1
        return 1

    def _full(self, obj: dict[str, Any]) -> int:
        c = self._c
        kind = obj.get("type")
        got = False
        if kind == "response.output_text.delta":
            got = c._add(c.text, obj.get("delta"))
        elif kind in _THINK_TYPES:
            got = c._add(c.thinking, obj.get("delta"))
        elif kind == "response.function_call_arguments.delta":
            got = c._add(c.tools, obj.get("delta"))
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                c.tool_calls += 1
                c.add_tool(item.get("name"))
        elif kind in ("response.created", "response.in_progress"):
            response = obj.get("response")
            if isinstance(response, dict) and isinstance(response.get("model"), str):
                c.model = response["model"]
        elif kind in _TERMINAL:
            self._terminal(kind, obj.get("response"))
        elif kind == "error" or obj.get("error") is not None:
            c.set_error(obj.get("error") or obj)
        if got:
            c.events += 1
        return int(got)

    def _terminal(self, kind: str, response: Any) -> None:
        c = self._c
        c.terminal = True
        if not isinstance(response, dict):
            if kind == "response.failed":
                c.set_error("response failed")
            return
        if isinstance(response.get("model"), str):
            c.model = response["model"]
        _status(c, response)
        _usage(c, response.get("usage"))
        if kind == "response.failed":
            c.set_error(response.get("error") or "response failed")
        c.final = _small(response)
