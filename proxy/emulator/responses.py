"""``POST /v1/responses``: the OpenAI Responses API as Ollama serves it (spec §8.7, stateless only).

Shapes follow Ollama's ``openai/responses.go``. Stream events are ``event: <type>\\ndata: <json>\\n\\n`` whose
data are Go ``map[string]any`` values, so **keys come out sorted**; each carries a ``sequence_number``. The
order: ``response.created``, ``response.in_progress``, then for thinking a ``reasoning`` output item with
``response.reasoning_summary_text.delta`` events (closed by ``…summary_text.done`` and
``response.output_item.done``), for text a ``message`` item (``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``…), for tool calls a ``function_call`` item
with one ``response.function_call_arguments.delta``, and finally ``response.completed`` whose ``response``
holds ``usage {input_tokens, output_tokens, total_tokens, …}``. Ollama reports ``status: "completed"``
even when ``max_output_tokens`` cut the answer. The non-streamed body is a ``ResponsesResponse`` in Go struct
order. Errors before the first byte use the OpenAI envelope (§8.1).

Differences from Ollama, on purpose: a mid-stream model error (``X-Emulate: error_after``) is sent as
``response.failed`` with ``response.error {code, message}``, the event OpenAI documents, where Ollama today
ends the stream without a terminal event (ollama/ollama#17118; ``close_after`` gives that).
"""

from __future__ import annotations

import random
import time
from typing import Any

from aiohttp import web

from . import gojson
from .anthropic import sse_event, tool_arguments
from .engine import Outcome, Plan, Token, run_inference
from .groundtruth import request_context
from .openai import openai_error
from .parsing import ApiError, knobs_for, lookup_model, parse_think, read_body, token_budget, tool_name
from .state import EMULATOR_KEY
from .textgen import chat_prompt_tokens, seed_of

__all__ = ["ResponsesRenderer", "responses"]

SSE_CT = "text/event-stream"
JSON_CT = "application/json"
_EFFORTS = {"none": False, "low": "low", "medium": "medium", "high": "high", "max": "max"}
_FIELDS = (
    "model", "background", "conversation", "include", "input", "instructions", "max_output_tokens",
    "reasoning", "temperature", "text", "top_p", "truncation", "tools", "stream",
)  # fmt: skip
_TYPES = {
    "model": "string", "instructions": "string", "max_output_tokens": "int", "stream": "bool",
    "tools": "array", "background": "bool",
}  # fmt: skip


def _sorted(value: Any) -> Any:
    """What Go's encoder does to a ``map[string]any``: keys in byte order, recursively."""
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "input_tokens": outcome.prompt_eval_count,
        "output_tokens": outcome.eval_count,
        "total_tokens": outcome.prompt_eval_count + outcome.eval_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


class ResponsesRenderer:
    """``response`` bodies and the Responses event stream for one request."""

    stream_content_type = SSE_CT

    def __init__(self, model: str, values: dict[str, Any], tool_name: str, tool_calls: int) -> None:
        self._model, self._values = model, values
        self._tool_name, self._tool_calls = tool_name, tool_calls
        self._id = f"resp_{random.randrange(999999)}"
        self._item_id = f"msg_{random.randrange(999999)}"
        self._reasoning_id = f"rs_{random.randrange(999999)}"
        self._seq = 0
        self._started = False
        self._output_index = 0
        self._reasoning: str | None = None  # accumulated thinking while the reasoning item is open
        self._reasoning_done = ""
        self._text: str | None = None  # accumulated text once the message item exists

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {**data, "type": kind, "sequence_number": self._seq}
        self._seq += 1
        return sse_event(kind, _sorted(data))

    def _object(self, status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        values = self._values
        temperature, top_p = values.get("temperature"), values.get("top_p")
        return {
            "id": self._id,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": self._model,
            "previous_response_id": None,
            "instructions": values.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": values.get("tools") or [],
            "tool_choice": "auto",
            "truncation": values.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}},
            "top_p": float(top_p) if isinstance(top_p, int | float) else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": float(temperature) if isinstance(temperature, int | float) else 1.0,
            "reasoning": None,
            "usage": usage,
            "max_output_tokens": values.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": values.get("background") is True,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [
            self._event("response.created", {"response": self._object("in_progress", [], None)}),
            self._event("response.in_progress", {"response": self._object("in_progress", [], None)}),
        ]

    def _reasoning_item(self, text: str) -> dict[str, Any]:
        summary = [{"type": "summary_text", "text": text}]
        return {"id": self._reasoning_id, "type": "reasoning", "summary": summary, "encrypted_content": text}

    def _finish_reasoning(self) -> list[bytes]:
        if self._reasoning is None:
            return []
        text, self._reasoning = self._reasoning, None
        self._reasoning_done = text
        where = {"item_id": self._reasoning_id, "output_index": self._output_index, "summary_index": 0}
        frames = [
            self._event("response.reasoning_summary_text.done", {**where, "text": text}),
            self._event(
                "response.output_item.done",
                {"output_index": self._output_index, "item": self._reasoning_item(text)},
            ),
        ]
        self._output_index += 1
        return frames

    def _message_item(self, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": self._text or "", "annotations": [], "logprobs": []}
        return {
            "id": self._item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part],
        }

    def token(self, token: Token) -> list[bytes]:
        frames = self._start()
        index = self._output_index
        if token.thinking:
            if self._reasoning is None:
                self._reasoning = ""
                item = {"id": self._reasoning_id, "type": "reasoning", "summary": []}
                frames.append(
                    self._event("response.output_item.added", {"output_index": index, "item": item})
                )
            self._reasoning += token.text
            delta = {"item_id": self._reasoning_id, "output_index": index, "summary_index": 0}
            frames.append(
                self._event("response.reasoning_summary_text.delta", {**delta, "delta": token.text})
            )
            return frames
        frames += self._finish_reasoning()
        index = self._output_index
        if self._text is None:
            self._text = ""
            item = {"id": self._item_id, "type": "message", "status": "in_progress", "role": "assistant"}
            item["content"] = []
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            where = {"item_id": self._item_id, "output_index": index, "content_index": 0}
            frames.append(self._event("response.output_item.added", {"output_index": index, "item": item}))
            frames.append(self._event("response.content_part.added", {**where, "part": part}))
        self._text += token.text
        where = {"item_id": self._item_id, "output_index": index, "content_index": 0}
        frames.append(
            self._event("response.output_text.delta", {**where, "delta": token.text, "logprobs": []})
        )
        return frames

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {
                "id": f"fc_{self._id}_{n}",
                "type": "function_call",
                "status": "completed",
                "call_id": f"call_{n:02d}",
                "name": self._tool_name,
                "arguments": gojson.dumps(tool_arguments(n)).decode(),
            }
            for n in range(self._tool_calls)
        ]

    def _output(self) -> list[Any]:
        output: list[Any] = []
        if self._reasoning_done:
            output.append(self._reasoning_item(self._reasoning_done))
        calls = self._calls()
        if calls:
            output += calls
        elif self._text is not None:
            output.append(self._message_item("completed"))
        return output

    def final(self, outcome: Outcome) -> list[bytes]:
        frames = self._start() + self._finish_reasoning()
        index = self._output_index
        if self._text is not None:
            where = {"item_id": self._item_id, "output_index": index, "content_index": 0}
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            frames += [
                self._event("response.output_text.done", {**where, "text": self._text, "logprobs": []}),
                self._event("response.content_part.done", {**where, "part": part}),
                self._event(
                    "response.output_item.done",
                    {"output_index": index, "item": self._message_item("completed")},
                ),
            ]
        for n, call in enumerate(self._calls()):
            at = {"item_id": call["id"], "output_index": index + n}
            added = {**call, "status": "in_progress", "arguments": ""}
            frames += [
                self._event("response.output_item.added", {"output_index": index + n, "item": added}),
                self._event("response.function_call_arguments.delta", {**at, "delta": call["arguments"]}),
                self._event("response.function_call_arguments.done", {**at, "arguments": call["arguments"]}),
                self._event("response.output_item.done", {"output_index": index + n, "item": call}),
            ]
        response = self._object("completed", self._output(), _usage(outcome))
        response["completed_at"] = int(time.time())
        frames.append(self._event("response.completed", {"response": response}))
        return frames

    def mid_error(self, message: str) -> list[bytes]:
        response = self._object("failed", self._output(), None)
        response["error"] = {"code": "server_error", "message": message}
        return [self._event("response.failed", {"response": response})]

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        self._text = outcome.text
        self._reasoning_done = outcome.thinking
        body = self._object("completed", self._output(), _usage(outcome))
        body["created_at"] = int(time.time())
        return gojson.dumps(body, newline=True), JSON_CT

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return openai_error(status, message)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
        )
    return ""


def _input_messages(raw: Any) -> list[dict[str, str]]:
    """``input`` as chat messages: a string is one user message; items with a role are messages."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}] if raw else []
    if not isinstance(raw, list):
        raise ApiError(400, "input must be a string or array")
    out = []
    for item in raw:
        if isinstance(item, dict) and (item.get("type") in (None, "message")) and item.get("role"):
            out.append({"role": str(item["role"]), "content": _content_text(item.get("content"))})
    return out


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses`` (stream defaults to false)."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(request, _FIELDS, _TYPES, "ResponsesRequest")
        requested = values.get("model") or ""
        entry.model = requested or None
        texts = _input_messages(values.get("input"))
        reasoning = values.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        if effort not in (None, "") and effort not in _EFFORTS:
            raise ApiError(
                400,
                f'invalid reasoning value: "{effort}" (must be "high", "medium", "low", "max", or "none")',
            )
        spec = lookup_model(emu, requested, empty_status=400)
        if spec.is_embedding:
            raise ApiError(400, f'"{requested}" does not support chat')
        think = parse_think(_EFFORTS.get(effort) if effort else None, spec, requested)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return openai_error(exc.status, exc.message)
    instructions = values.get("instructions") or ""
    natural = knobs.tokens if knobs.tokens is not None else emu.config.default_tokens
    tokens, reason = token_budget(values.get("max_output_tokens"), natural, emu.config.default_tokens)
    plan = Plan(
        model=spec.name,
        stream=values.get("stream") is True,
        prompt_eval_count=chat_prompt_tokens(texts, instructions),
        tokens=tokens,
        done_reason=reason,
        seed=seed_of(spec.name, instructions, *(t["content"] for t in texts)),
        keep_alive_s=emu.config.keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
    )
    calls = knobs.tool_calls or 0
    renderer = ResponsesRenderer(requested, values, tool_name(values.get("tools")), calls)
    return await run_inference(request, emu, entry, plan, renderer, start_ns)
