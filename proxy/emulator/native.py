"""``/api/generate`` and ``/api/chat``: NDJSON streams, single objects, load/unload replies.

Byte shapes follow spec §3-§5: Go field order, ``omitempty`` metrics left out when zero, one compact line
per token, the done line with every metric, ``context`` on non-raw generate only.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from . import gojson
from .engine import Outcome, Plan, Token, run_inference, scheduled
from .groundtruth import LogEntry, request_context
from .guard import apply_guard
from .parsing import (
    ApiError,
    capability_error,
    knobs_for,
    lookup_model,
    options_of,
    parse_keep_alive,
    parse_think,
    read_body,
    token_budget,
    tools_error,
)
from .state import EMULATOR_KEY
from .textgen import chat_prompt_tokens, context_ids, count_words, now_rfc3339, prompt_parts, seed_of

__all__ = ["JSON_CT", "NDJSON_CT", "NativeRenderer", "chat", "error_response", "generate"]

JSON_CT = "application/json; charset=utf-8"
NDJSON_CT = "application/x-ndjson"

_GENERATE_FIELDS = (
    "model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format", "images",
    "options", "keep_alive", "think", "truncate", "shift", "logprobs", "top_logprobs",
)  # fmt: skip
_GENERATE_TYPES = {
    "model": "string", "prompt": "string", "suffix": "string", "system": "string", "template": "string",
    "context": "array", "stream": "bool", "raw": "bool", "images": "array", "options": "object",
    "truncate": "bool", "shift": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip
_CHAT_FIELDS = (
    "model", "messages", "tools", "format", "options", "keep_alive", "stream", "think", "truncate", "shift",
    "logprobs", "top_logprobs",
)  # fmt: skip
_CHAT_TYPES = {
    "model": "string", "messages": "array", "tools": "array", "options": "object", "stream": "bool",
    "truncate": "bool", "shift": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip


def error_response(status: int, message: str, content_type: str = JSON_CT) -> web.Response:
    """A native ``{"error": msg}`` body (no trailing newline)."""
    return web.Response(
        status=status, body=gojson.dumps({"error": message}), headers={"Content-Type": content_type}
    )


def _metrics(outcome: Outcome) -> dict[str, Any]:
    """The metrics tail in Go struct order, zero values omitted (``omitempty``)."""
    values = {
        "total_duration": outcome.total_ns,
        "load_duration": outcome.load_ns,
        "prompt_eval_count": outcome.prompt_eval_count,
        "prompt_eval_duration": outcome.prompt_eval_ns,
        "eval_count": outcome.eval_count,
        "eval_duration": outcome.eval_ns,
    }
    return {key: value for key, value in values.items() if value}


class NativeRenderer:
    """Generate (``chat=False``) or chat (``chat=True``) NDJSON lines and single objects."""

    stream_content_type = NDJSON_CT

    def __init__(self, model: str, chat: bool, context: list[int] | None) -> None:
        self._model, self._chat, self._context = model, chat, context

    def _body(self, created_at: str, text: str, thinking: str, done: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "created_at": created_at}
        if self._chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            body["message"] = message
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = done
        return body

    def token(self, token: Token) -> list[bytes]:
        text, thinking = ("", token.text) if token.thinking else (token.text, "")
        return [gojson.dumps(self._body(now_rfc3339(), text, thinking, False), newline=True)]

    def _done(self, outcome: Outcome, text: str, thinking: str) -> dict[str, Any]:
        body = self._body(outcome.created_at, text, thinking, True)
        body["done_reason"] = outcome.done_reason
        if self._context is not None and not self._chat:
            body["context"] = self._context
        body.update(_metrics(outcome))
        return body

    def final(self, outcome: Outcome) -> list[bytes]:
        return [gojson.dumps(self._done(outcome, "", ""), newline=True)]

    def mid_error(self, message: str) -> list[bytes]:
        return [gojson.dumps({"error": message}, newline=True)]

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        return gojson.dumps(self._done(outcome, outcome.text, outcome.thinking)), JSON_CT

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return error_response(status, message, "application/json" if in_stream else JSON_CT)


async def _load_or_unload(
    request: web.Request,
    entry: LogEntry,
    start_ns: int,
    model: str,
    requested: str,
    keep_alive_s: float,
    chat: bool,
) -> web.Response:
    """Empty prompt/messages: load the model (after scheduling) or, with ``keep_alive: 0``, unload it."""
    emu = request.app[EMULATOR_KEY]
    if keep_alive_s == 0:
        emu.scheduler.unload(model)
        reason = "unload"
    else:
        async with scheduled(emu, model, keep_alive_s, None):
            entry.load_ns = time.monotonic_ns() - start_ns
        reason = "load"
    entry.done_reason = reason
    body: dict[str, Any] = {"model": requested, "created_at": now_rfc3339()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    body.update(done=True, done_reason=reason)
    return web.Response(status=200, body=gojson.dumps(body), headers={"Content-Type": JSON_CT})


async def generate(request: web.Request) -> web.StreamResponse:
    """``POST /api/generate``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(request, _GENERATE_FIELDS, _GENERATE_TYPES, "GenerateRequest")
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=404)
        raw = values.get("raw") is True
        if raw and (values.get("template") or values.get("system") or values.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        if spec.is_embedding:
            raise capability_error(spec, requested, "generate")
        if values.get("suffix") and "insert" not in spec.capabilities:
            raise ApiError(400, f"registry.ollama.ai/library/{spec.name} does not support insert")
        think = parse_think(values.get("think"), spec, requested)
        keep_alive_s = parse_keep_alive(values.get("keep_alive"), emu.config.keep_alive_s)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return error_response(exc.status, exc.message)
    prompt, system, suffix = (values.get(k) or "" for k in ("prompt", "system", "suffix"))
    stream = values.get("stream") is not False
    entry.stream = stream
    if prompt == "" and suffix == "":
        return await _load_or_unload(request, entry, start_ns, spec.name, requested, keep_alive_s, chat=False)
    previous = values.get("context") or []
    if raw:
        prompt_tokens = max(1, count_words(prompt))
    else:
        prompt_tokens = count_words(system) + count_words(prompt) + count_words(suffix) + 6 + len(previous)
    tokens, reason = token_budget(
        options_of(values).get("num_predict"), knobs.tokens, emu.config.default_tokens
    )
    seed = seed_of(spec.name, system, prompt, suffix)
    plan = Plan(
        model=spec.name,
        stream=stream,
        prompt_eval_count=prompt_tokens,
        tokens=tokens,
        done_reason=reason,
        seed=seed,
        keep_alive_s=keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
    )
    context = None if raw else context_ids(seed, prompt_tokens + tokens)
    renderer = NativeRenderer(requested, chat=False, context=context)
    return await run_inference(request, emu, entry, plan, renderer, start_ns)


def _check_messages(messages: list[Any]) -> list[dict[str, Any]]:
    checked: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            kind = gojson.go_type_name(message)
            raise ApiError(
                400,
                f"json: cannot unmarshal {kind} into Go struct field ChatRequest.messages of type api.Message",
            )
        folded = gojson.fold(
            message, ("role", "content", "thinking", "images", "tool_calls", "tool_name"), "Message"
        )
        try:
            gojson.require_types(folded, {"role": "string", "content": "string"}, "ChatRequest.messages")
        except gojson.GoJSONError as exc:
            raise ApiError(400, str(exc)) from None
        checked.append(folded)
    return checked


async def chat(request: web.Request) -> web.StreamResponse:
    """``POST /api/chat``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(request, _CHAT_FIELDS, _CHAT_TYPES, "ChatRequest")
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=400)
        if spec.is_embedding:
            raise capability_error(spec, requested, "chat")
        messages = _check_messages(values.get("messages") or [])
        if values.get("tools") and "tools" not in spec.capabilities:
            raise tools_error(spec)
        think = parse_think(values.get("think"), spec, requested)
        keep_alive_s = parse_keep_alive(values.get("keep_alive"), emu.config.keep_alive_s)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return error_response(exc.status, exc.message)
    stream = values.get("stream") is not False
    entry.stream = stream
    if not messages:
        return await _load_or_unload(request, entry, start_ns, spec.name, requested, keep_alive_s, chat=True)
    tokens, reason = token_budget(
        options_of(values).get("num_predict"), knobs.tokens, emu.config.default_tokens
    )
    contents = [str(m.get("content") or "") for m in messages]
    plan = Plan(
        model=spec.name,
        stream=stream,
        prompt_eval_count=chat_prompt_tokens(messages),
        tokens=tokens,
        done_reason=reason,
        seed=seed_of(spec.name, *contents),
        keep_alive_s=keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
        prompt_parts=prompt_parts(messages),
    )
    apply_guard(plan, messages)
    renderer = NativeRenderer(requested, chat=True, context=None)
    return await run_inference(request, emu, entry, plan, renderer, start_ns)
