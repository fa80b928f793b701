"""The OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, models.

Shapes follow spec §8: SSE events ``data: <json>\\n\\n``, the chat stream's role chunk, content chunks, the
``"delta":{}`` finish chunk, the ``"choices":[]`` usage chunk only with ``include_usage``, then
``data: [DONE]``; completions carry zero usage on every chunk when ``include_usage``. Non-streamed bodies
and errors end in ``\\n`` (Go's ``json.Encoder``); errors use the OpenAI envelope.
"""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import Any

from aiohttp import web

from . import gojson
from .embed import run_embedding, vectors
from .engine import Outcome, Plan, Token, run_inference
from .groundtruth import request_context
from .parsing import (
    ApiError,
    capability_error,
    knobs_for,
    lookup_model,
    parse_think,
    read_body,
    token_budget,
    tools_error,
)
from .state import EMULATOR_KEY, normalize_name
from .textgen import chat_prompt_tokens, count_words, seed_of

__all__ = ["chat_completions", "completions", "embeddings", "list_models", "openai_error", "retrieve_model"]

OPENAI_CT = "application/json"
SSE_CT = "text/event-stream"
FINGERPRINT = "fp_ollama"
_EFFORT = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "max": "max"}
_EFFORT.update({"xhigh": "max", "ultra": "max"})


def openai_error(status: int, message: str) -> web.Response:
    """``{"error":{"message","type","param","code"}}\\n`` with the type Ollama derives from the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.Response(
        status=status, body=gojson.dumps(body, newline=True), headers={"Content-Type": OPENAI_CT}
    )


def _sse(value: Any) -> bytes:
    return b"data: " + gojson.dumps(value) + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(values: dict[str, Any]) -> bool:
    options = values.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class ChatRenderer:
    """``chat.completion`` objects and ``chat.completion.chunk`` events."""

    stream_content_type = SSE_CT

    def __init__(self, model: str, include_usage: bool) -> None:
        self._model, self._include_usage = model, include_usage
        self._id = f"chatcmpl-{random.randrange(999)}"
        self._created = int(time.time())
        self._sent_any = False

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse(self._head("chat.completion.chunk") | {"choices": [choice]})

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": kind,
            "created": self._created,
            "model": self._model,
            "system_fingerprint": FINGERPRINT,
        }

    def _delta(self, content: str, reasoning: str) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._sent_any:
            delta = {"role": "assistant", "content": content}
            self._sent_any = True
        elif content or not reasoning:
            delta["content"] = content
        if reasoning:
            delta["reasoning"] = reasoning
        return delta

    def token(self, token: Token) -> list[bytes]:
        content, reasoning = ("", token.text) if token.thinking else (token.text, "")
        return [self._chunk(self._delta(content, reasoning), None)]

    def final(self, outcome: Outcome) -> list[bytes]:
        events = [] if self._sent_any else [self._chunk(self._delta("", ""), None)]
        events.append(self._chunk({}, outcome.done_reason))
        if self._include_usage:
            usage = _usage(outcome.prompt_eval_count, outcome.eval_count)
            events.append(_sse(self._head("chat.completion.chunk") | {"choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return events

    def mid_error(self, message: str) -> list[bytes]:
        # Ollama's ChatWriter decodes the error line as an empty response: one empty content chunk, then EOF
        return [self._chunk(self._delta("", ""), None)]

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
        if outcome.thinking:
            message["reasoning"] = outcome.thinking
        choice = {"index": 0, "message": message, "finish_reason": outcome.done_reason}
        body = self._head("chat.completion") | {
            "choices": [choice],
            "usage": _usage(outcome.prompt_eval_count, outcome.eval_count),
        }
        return gojson.dumps(body, newline=True), OPENAI_CT

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return openai_error(status, message)


class CompletionRenderer:
    """``text_completion`` objects and events (no separate finish chunk: the done chunk carries it)."""

    stream_content_type = SSE_CT

    def __init__(self, model: str, include_usage: bool) -> None:
        self._model, self._include_usage = model, include_usage
        self._id = f"cmpl-{random.randrange(999)}"

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
        body: dict[str, Any] = {
            "id": self._id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": choices,
            "model": self._model,
            "system_fingerprint": FINGERPRINT,
        }
        if usage is not None:
            body["usage"] = usage
        return _sse(body)

    def _text(self, text: str, finish: str | None) -> bytes:
        zero = _usage(0, 0) if self._include_usage else None
        return self._event([{"text": text, "index": 0, "finish_reason": finish}], zero)

    def token(self, token: Token) -> list[bytes]:
        return [self._text("" if token.thinking else token.text, None)]

    def final(self, outcome: Outcome) -> list[bytes]:
        events = [self._text("", outcome.done_reason)]
        if self._include_usage:
            events.append(self._event([], _usage(outcome.prompt_eval_count, outcome.eval_count)))
        events.append(b"data: [DONE]\n\n")
        return events

    def mid_error(self, message: str) -> list[bytes]:
        return [self._text("", None)]

    def single(self, outcome: Outcome) -> tuple[bytes, str]:
        body = {
            "id": self._id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self._model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"text": outcome.text, "index": 0, "finish_reason": outcome.done_reason}],
            "usage": _usage(outcome.prompt_eval_count, outcome.eval_count),
        }
        return gojson.dumps(body, newline=True), OPENAI_CT

    def error(self, status: int, message: str, in_stream: bool) -> web.Response:
        return openai_error(status, message)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _think_value(values: dict[str, Any]) -> Any:
    effort = values.get("reasoning_effort")
    reasoning = values.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORT:
        raise ApiError(
            400,
            f'invalid reasoning value: \'{effort}\' (must be "minimal", "low", "medium", "high", or "none")',
        )
    return _EFFORT[effort]


_CHAT_FIELDS = (
    "model", "messages", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
    "frequency_penalty", "presence_penalty", "response_format", "tools", "reasoning_effort", "reasoning",
    "logprobs", "top_logprobs",
)  # fmt: skip
_CHAT_TYPES = {
    "model": "string",
    "messages": "array",
    "stream": "bool",
    "max_tokens": "int",
    "tools": "array",
}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions`` (stream defaults to false)."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(request, _CHAT_FIELDS, _CHAT_TYPES, "ChatCompletionRequest")
        messages = values.get("messages") or []
        if not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=400)
        if spec.is_embedding:
            raise capability_error(spec, requested, "chat")
        if values.get("tools") and "tools" not in spec.capabilities:
            raise tools_error(spec)
        think = parse_think(_think_value(values), spec, requested)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return openai_error(exc.status, exc.message)
    stream = values.get("stream") is True
    texts = [{"content": _message_text(m.get("content")) if isinstance(m, dict) else ""} for m in messages]
    tokens, reason = token_budget(values.get("max_tokens"), knobs.tokens, emu.config.default_tokens)
    plan = Plan(
        model=spec.name,
        stream=stream,
        prompt_eval_count=chat_prompt_tokens(texts),
        tokens=tokens,
        done_reason=reason,
        seed=seed_of(spec.name, *(t["content"] for t in texts)),
        keep_alive_s=emu.config.keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
    )
    renderer = ChatRenderer(requested, _include_usage(values))
    return await run_inference(request, emu, entry, plan, renderer, start_ns)


_COMPLETION_FIELDS = (
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "seed", "stop", "frequency_penalty",
    "presence_penalty", "stream", "stream_options", "logprobs",
)  # fmt: skip


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(
            request,
            _COMPLETION_FIELDS,
            {
                "model": "string",
                "prompt": "string",
                "suffix": "string",
                "stream": "bool",
                "max_tokens": "int",
            },
            "CompletionRequest",
        )
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=404)
        if spec.is_embedding:
            raise capability_error(spec, requested, "generate")
        think = parse_think(None, spec, requested)
        knobs = knobs_for(emu, request)
    except ApiError as exc:
        entry.error_message = exc.message
        return openai_error(exc.status, exc.message)
    prompt, suffix = values.get("prompt") or "", values.get("suffix") or ""
    tokens, reason = token_budget(values.get("max_tokens"), knobs.tokens, emu.config.default_tokens)
    plan = Plan(
        model=spec.name,
        stream=values.get("stream") is True,
        prompt_eval_count=count_words(prompt) + count_words(suffix) + 6,
        tokens=tokens,
        done_reason=reason,
        seed=seed_of(spec.name, "", prompt, suffix),
        keep_alive_s=emu.config.keep_alive_s,
        knobs=knobs,
        think_tokens=tokens // 3 if think else 0,
    )
    renderer = CompletionRenderer(requested, _include_usage(values))
    return await run_inference(request, emu, entry, plan, renderer, start_ns)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings``."""
    emu = request.app[EMULATOR_KEY]
    entry, start_ns = request_context(request)
    try:
        values = await read_body(
            request,
            ("model", "input", "dimensions", "encoding_format"),
            {"model": "string", "dimensions": "int"},
            "EmbedRequest",
        )
        raw = values.get("input")
        if raw == "":
            raw = [""]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
            inputs = list(raw)
        else:
            raise ApiError(400, "invalid input")
        encoding = values.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"invalid encoding format: {encoding!r}")
        requested = values.get("model") or ""
        entry.model = requested or None
        spec = lookup_model(emu, requested, empty_status=404)
        knobs = knobs_for(emu, request)
        result = await run_embedding(emu, entry, spec, inputs, emu.config.keep_alive_s, knobs, start_ns)
    except ApiError as exc:
        entry.error_message = exc.message
        return openai_error(exc.status, exc.message)
    data = []
    for index, vector in enumerate(vectors(spec, inputs, values.get("dimensions"))):
        item: Any = vector
        if encoding == "base64":
            item = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "embedding": item, "index": index})
    body = {
        "object": "list",
        "data": data,
        "model": requested,
        "usage": {"prompt_tokens": result.prompt_eval_count, "total_tokens": result.prompt_eval_count},
    }
    return web.Response(body=gojson.dumps(body, newline=True), headers={"Content-Type": OPENAI_CT})


def _owned_by(name: str) -> str:
    parts = name.split(":")[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def _model_object(model_id: str, created: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": _owned_by(normalize_name(model_id)),
    }


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``; with no models ``data`` is ``null`` (a nil Go slice)."""
    emu = request.app[EMULATOR_KEY]
    data = [_model_object(name, int(emu.modified_at[name].timestamp())) for name in emu.installed] or None
    body = {"object": "list", "data": data}
    return web.Response(body=gojson.dumps(body, newline=True), headers={"Content-Type": OPENAI_CT})


async def retrieve_model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model}``."""
    emu = request.app[EMULATOR_KEY]
    requested = request.match_info["model"]
    spec = emu.resolve(requested)
    if spec is None:
        return openai_error(404, f"model '{requested}' not found")
    body = _model_object(requested, int(emu.modified_at[spec.name].timestamp()))
    return web.Response(body=gojson.dumps(body, newline=True), headers={"Content-Type": OPENAI_CT})
