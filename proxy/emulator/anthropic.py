"""``POST /v1/messages``: the Anthropic Messages API as Ollama serves it (spec §8.7).

Shapes follow Ollama's ``anthropic`` package and ``AnthropicMessagesMiddleware`` (Go struct order, so field
order is fixed): SSE frames are ``event: <type>\\ndata: <json>\\n\\n``. A stream is ``message_start`` (its
``usage.input_tokens`` is Ollama's len/4 *estimate* of the request, since the real count only exists at the
end), a ``ping``, then per block ``content_block_start`` / ``content_block_delta`` (``thinking_delta``,
``text_delta``, ``input_json_delta``) / ``content_block_stop``, then ``message_delta`` with ``stop_reason``
and the real ``usage`` (``input_tokens`` = prompt_eval_count, ``output_tokens`` = eval_count) and
``message_stop``. ``stop_reason`` maps ``stop`` → ``end_turn``, ``length`` → ``max_tokens``, and is
``tool_use`` whenever a tool was called. Errors use ``{"type":"error","error":{"type","message"}}``.

Differences from Ollama, on purpose: Ollama's converter sends no ``ping`` (Anthropic does; clients ignore
it), and a mid-stream model error (``X-Emulate: error_after``) is sent as an ``event: error`` frame, the
shape Anthropic documents, where Ollama today drops it and just ends the stream (``close_after`` gives that
truncated stream).
"""

from __future__ import annotations

import secrets
from typing import Any

from aiohttp import web

from . import gojson
from .engine import Outcome, Plan, Token, run_inference
from .groundtruth import request_context
from .parsing import ApiError, knobs_for, lookup_model, parse_think, read_body, token_budget, tool_name
from .state import EMULATOR_KEY
from .textgen import chat_prompt_tokens, seed_of

__all__ = ["MessagesRenderer", "anthropic_error", "messages", "tool_arguments"]

SSE_CT = "text/event-stream"
JSON_CT = "application/json"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
_FIELDS = (
    "model", "max_tokens", "messages", "system", "stream", "temperature", "top_p", "top_k", "stop_sequences",
    "tools", "tool_choice", "thinking", "metadata", "output_config",
)  # fmt: skip
_TYPES = {
    "model": "string", "max_tokens": "int", "messages": "array", "stream": "bool", "top_k": "int",
    "stop_sequences": "array", "tools": "array",
}  # fmt: skip


def anthropic_error(status: int, message: str, *, newline: bool = True) -> web.Response:
    """``{"type":"error","error":{"type","message"},"request_id"}`` with the type Ollama derives from the status."""
    body = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_" + secrets.token_hex(12),
    }
    content_type = JSON_CT if newline else "application/json; charset=utf-8"
    return web.Response(
        status=status, body=gojson.dumps(body, newline=newline), headers={"Content-Type": content_type}
    )


def sse_event(name: str, data: Any) -> bytes:
    """One ``event:`` + ``data:`` frame, as Ollama's ``writeSSE`` writes it."""
    return b"event: " + name.encode() + b"\ndata: " + gojson.dumps(data) + b"\n\n"


def tool_arguments(index: int) -> dict[str, Any]:
    """The arguments of the emulator's ``index``-th tool call (Go marshals map keys sorted)."""
    return {"city": "Paris", "n": index}


def stop_reason(done_reason: str, tool_calls: int) -> str:
    if tool_calls:
        return "tool_use"
    return _STOP_REASONS.get(done_reason, "stop_sequence" if done_reason else "")


class MessagesRenderer:
    """``message`` bodies and the Messages event stream for one request."""

    stream_content_type = SSE_CT

    def __init__(self, model: str, estimated_input: int, tool_name: str, tool_calls: int) -> None:
        self._model, self._estimated = model, estimated_input
        self._tool_name, self._tool_calls = tool_name, tool_calls
        self._id = "msg_" + secrets.token_hex(12)
        self._started = False
        self._index = 0
        self._open: str | None = None  # the kind of the open content block

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "usage": {"input_tokens": self._estimated, "output_tokens": 0},
        }
        return [
            sse_event("message_start", {"type": "message_start", "message": message}),
            sse_event("ping", {"type": "ping"}),
        ]

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        frame = sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index})
        self._index += 1
        return [frame]

    def _block(self, kind: str) -> list[bytes]:
        if self._open == kind:
            return []
        frames = self._close_block()
        self._open = kind
        block = {"type": kind, kind: ""}
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return [*frames, sse_event("content_block_start", start)]

    def token(self, token: Token) -> list[bytes]:
        kind = "thinking" if token.thinking else "text"
        frames = self._start() + self._block(kind)
        delta = {"type": f"{kind}_delta", kind: token.text}
        event = {"type": "content_block_delta", "index": self._index, "delta": delta}
        frames.append(sse_event("content_block_delta", event))
        return frames

    def _tools(self) -> list[bytes]:
        frames = self._close_block()
        for n in range(self._tool_calls):
            block = {"type": "tool_use", "id": f"toolu_{n:02d}", "name": self._tool_name, "input": {}}
            start = {"type": "content_block_start", "index": self._index, "content_block": block}
            partial = gojson.dumps(tool_arguments(n)).decode()
            delta = {"type": "input_json_delta", "partial_json": partial}
            frames += [
                sse_event("content_block_start", start),
                sse_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self._index, "delta": delta},
                ),
                sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index}),
            ]
            self._index += 1
        return frames

    def final(self, outcome: Outcome) -> list[bytes]:
        frames = self._start() + self._tools() + self._close_block()
        reason = stop_reason(outcome.done_reason, self._tool_calls)
        delta: dict[str, Any] = {"stop_reason": reason} if reason else {}
        usage = {"input_tokens": outcome.prompt_eval_count, "output_tokens": outcome.eval_count}
        frames.append(sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        frames.append(sse_event("message_stop", {"type": "message_stop"}))
        return frames

    def mid_error(self, message: str) -> list[bytes]:
        error = {"type": "error", "error": {"type": "api_error", "message": message}}
        return [sse_event("error", error)]

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        content: list[dict[str, Any]] = []
        if outcome.thinking:
            content.append({"type": "thinking", "thinking": outcome.thinking})
        if outcome.text:
            content.append({"type": "text", "text": outcome.text})
        for n in range(self._tool_calls):
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{n:02d}",
                    "name": self._tool_name,
                    "input": tool_arguments(n),
                }
            )
        body: dict[str, Any] = {"id": self._id, "type": "message", "role": "assistant", "model": self._model}
        body["content"] = content
        reason = stop_reason(outcome.done_reason, self._tool_calls)
        if reason:
            body["stop_reason"] = reason
        body["usage"] = {"input_tokens": outcome.prompt_eval_count, "output_tokens": outcome.eval_count}
        return gojson.dumps(body, newline=True), JSON_CT

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return anthropic_error(status, message)


def _block_text(content: Any) -> str:
    """A message's text: a string, or the ``text`` of its text blocks (Ollama concatenates them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(block.get("text") or "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _estimate(system: str, messages: list[dict[str, str]]) -> int:
    """Ollama's ``EstimateInputTokens``: bytes of system, roles and content over 4, at least 1."""
    total = len(system.encode())
    for message in messages:
        total += len(message["role"].encode()) + len(message["content"].encode())
    return max(total // 4, 1 if messages or system else 0)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages`` (stream defaults to false; ``max_tokens`` is required)."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(request, _FIELDS, _TYPES, "MessagesRequest")
        requested = values.get("model") or ""
        entry.model = requested or None
        if not requested:
            raise ApiError(400, "model is required")
        max_tokens = values.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ApiError(400, "max_tokens is required and must be positive")
        raw_messages = values.get("messages") or []
        if not raw_messages:
            raise ApiError(400, "messages is required")
    except ApiError as exc:
        entry.error_message = exc.message
        return anthropic_error(exc.status, exc.message, newline=False)
    try:
        spec = lookup_model(emu, requested, empty_status=400)
        if spec.is_embedding:
            raise ApiError(400, f'"{requested}" does not support chat')
        thinking = values.get("thinking")
        wanted = thinking.get("type") if isinstance(thinking, dict) else None
        # Ollama sets relax_thinking here: asking a non-thinking model to think is not an error.
        think = parse_think({"enabled": True, "disabled": False}.get(str(wanted)), spec, requested)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return anthropic_error(exc.status, exc.message)
    system = _block_text(values.get("system"))
    texts = [
        {"role": str(m.get("role") or ""), "content": _block_text(m.get("content"))}
        for m in raw_messages
        if isinstance(m, dict)
    ]
    # max_tokens is mandatory here, so it caps what the model wants rather than setting it (docs/emulator.md)
    natural = knobs.tokens if knobs.tokens is not None else emu.config.default_tokens
    tokens, reason = token_budget(max_tokens, natural, emu.config.default_tokens)
    plan = Plan(
        model=spec.name,
        stream=values.get("stream") is True,
        prompt_eval_count=chat_prompt_tokens(texts, system),
        tokens=tokens,
        done_reason=reason,
        seed=seed_of(spec.name, system, *(t["content"] for t in texts)),
        keep_alive_s=emu.config.keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
    )
    calls = knobs.tool_calls or 0
    renderer = MessagesRenderer(requested, _estimate(system, texts), tool_name(values.get("tools")), calls)
    return await run_inference(request, emu, entry, plan, renderer, start_ns)
