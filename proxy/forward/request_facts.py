"""The request side: what a client asked for, read the way Ollama's Go server reads it (spec §1, §3, §8).

Bodies are read as Go's ``encoding/json`` reads them (``request_json``), so the record describes what Ollama
actually did; this module reads the native and OpenAI routes and hands Messages/Responses to
``request_agents`` and the multipart transcription route to ``request_audio``. ``options`` is a ``map[string]any`` checked by
``Options.FromMap`` with exact key lookups, so option keys are case-sensitive. Nothing here raises: an
unreadable body gives ``parse_error`` (the request is forwarded anyway; Ollama judges it), a wrongly typed
field gives ``None`` with the raw value kept, small, in ``extra``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson

from proxy.forward.conversations import chat_opening
from proxy.forward.request_agents import fill_messages, fill_responses
from proxy.forward.request_audio import inspect_transcription
from proxy.forward.request_json import (
    NeedsOrder,
    RequestFacts,
    clean,
    fold,
    go_number,
    slow_parse,
    small,
    stop_list,
    texts,
)
from proxy.forward.streams.facts import Flavor

__all__ = ["RequestFacts", "inspect_request"]

logger = logging.getLogger(__name__)

_NATIVE = frozenset({Flavor.GENERATE, Flavor.CHAT, Flavor.EMBED, Flavor.EMBEDDINGS})
_EMBEDDING = frozenset({Flavor.EMBED, Flavor.EMBEDDINGS, Flavor.OPENAI_EMBEDDINGS})
_STREAMING = frozenset({Flavor.GENERATE, Flavor.CHAT})  # native default; /v1 defaults to false
_ZERO_DURATION_RE = re.compile(r"[-+]?(?:(?:0+\.?0*|\.0+)(?:ns|us|µs|μs|ms|s|m|h))+")
# native option -> (RequestFacts field, kind); kind "i" int, "f" float
_OPTION_FIELDS = {
    "temperature": ("temperature", "f"),
    "num_predict": ("max_tokens", "i"),
    "top_k": ("top_k", "i"),
    "top_p": ("top_p", "f"),
    "repeat_penalty": ("repeat_penalty", "f"),
    "seed": ("seed", "i"),
    "num_ctx": ("num_ctx", "i"),
}
# /v1 top-level fields recorded as facts; Go binds them into *float64 / *int (no float → int truncation)
_V1_FIELDS = {
    "temperature": ("temperature", "f"),
    "top_p": ("top_p", "f"),
    "max_tokens": ("max_tokens", "i"),
    "seed": ("seed", "i"),
}
_NATIVE_SCALARS = ("raw", "truncate", "shift", "logprobs", "top_logprobs", "dimensions", "think")
_V1_SCALARS = (
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
    "logprobs",
    "top_logprobs",
    "dimensions",
    "encoding_format",
    "n",
)


def _is_zero_duration(value: Any) -> bool:
    """``keep_alive`` 0 means unload: a number of seconds that truncates to 0 ns, or a Go duration of 0."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value) and 0 <= value and int(value * 1e9) == 0
    if isinstance(value, str):
        return value in ("0", "+0", "-0") or _ZERO_DURATION_RE.fullmatch(value) is not None
    return False


def _message_texts(messages: list[Any], flavor: Flavor) -> tuple[list[str], int]:
    """Content (string or text parts) and thinking of every message; also counts images."""
    thinking_key = "reasoning" if flavor is Flavor.OPENAI_CHAT else "thinking"
    parts: list[str] = []
    images = 0
    for raw in messages:
        if not isinstance(raw, dict):
            continue
        msg = fold(raw)
        content = msg.get("content")
        if isinstance(content, str):
            parts.extend(texts(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    folded = fold(part)
                    parts.extend(texts(folded.get("text")))
                    images += folded.get("type") == "image_url"
        parts.extend(texts(msg.get(thinking_key)))
        if isinstance(msg.get("images"), list):
            images += len(msg["images"])
    return parts, images


def inspect_request(flavor: Flavor, body: bytes, content_type: str | None = None) -> RequestFacts:
    """Read a request body for ``flavor``; never raises. ``content_type`` matters only to the multipart
    transcription route (its boundary); every other body is JSON whatever the header says."""
    if flavor is Flavor.OPENAI_TRANSCRIPTION:
        return inspect_transcription(body, content_type)
    facts = RequestFacts(stream=flavor in _STREAMING)
    if not body.strip():
        facts.parse_error = "missing request body"
        return facts
    slow = False
    try:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            slow = True
            obj = slow_parse(body)
        if not isinstance(obj, dict):
            facts.parse_error = f"body is JSON {type(obj).__name__}, not an object"
            return facts
        try:
            _fill(facts, flavor, obj)
        except NeedsOrder:
            slow = True
            facts = RequestFacts(stream=flavor in _STREAMING)
            _fill(facts, flavor, slow_parse(body))
    except (ValueError, RecursionError) as exc:
        facts.parse_error = f"body is not JSON: {str(exc)[:200]}"
        return facts
    except Exception as exc:  # a bug here must not cost the request its record
        logger.exception("inspect_request failed for %s", flavor.name)
        facts.parse_error = f"ollamon could not inspect the body: {exc!r}"[:300]
    if slow:
        facts.prompt_text = clean(facts.prompt_text)
        facts.model = clean(facts.model) if facts.model is not None else None
        facts.stop = [clean(s) for s in facts.stop] if facts.stop is not None else None
    facts.prompt_chars = len(facts.prompt_text)
    return facts


def _fill(facts: RequestFacts, flavor: Flavor, obj: dict[str, Any]) -> None:
    top = fold(obj)
    extra = facts.extra
    model = top.get("model")
    if isinstance(model, str):
        facts.model = model
    elif model is not None:
        extra["model"] = small(model)
    stream = top.get("stream")
    if isinstance(stream, bool) and flavor not in _EMBEDDING:
        facts.stream = stream
    elif stream is not None:
        extra["stream"] = small(stream)
    if isinstance(top.get("tools"), list):
        extra["tools"] = len(top["tools"])
    if flavor in _NATIVE:
        _fill_native(facts, flavor, top)
    elif flavor is Flavor.ANTHROPIC_MESSAGES:
        fill_messages(facts, top)
    elif flavor is Flavor.OPENAI_RESPONSES:
        fill_responses(facts, top)
    else:
        _fill_openai(facts, flavor, top)
    facts.opening = chat_opening(flavor, top)


def _fill_native(facts: RequestFacts, flavor: Flavor, top: dict[str, Any]) -> None:
    extra = facts.extra
    parts: list[str] = []
    images = 0
    # A load is an empty/absent prompt, messages or input; a wrongly typed one is a 400, not a load.
    if flavor is Flavor.GENERATE:
        for key in ("system", "prompt", "suffix"):
            value = top.get(key)
            if isinstance(value, str):
                parts.extend(texts(value))
            elif value is not None:
                extra[key] = small(value)
        facts.is_load = top.get("prompt") in (None, "")
        facts.turns = 1
        if isinstance(top.get("images"), list):
            images = len(top["images"])
    elif flavor is Flavor.CHAT:
        messages = top.get("messages")
        if isinstance(messages, list):
            parts, images = _message_texts(messages, flavor)
            facts.turns = sum(isinstance(m, dict) for m in messages)
        elif messages is not None:
            extra["messages"] = small(messages)
        facts.is_load = messages is None or messages == []
    elif flavor is Flavor.EMBED:
        inp = top.get("input")
        parts = texts(inp)
        facts.is_load = inp is None or inp == "" or inp == []
    else:  # legacy /api/embeddings
        prompt = top.get("prompt")
        parts = texts(prompt) if isinstance(prompt, str) else []
        facts.is_load = prompt in (None, "")
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    keep_alive = top.get("keep_alive")
    if keep_alive is not None:
        extra["keep_alive"] = small(keep_alive)
    facts.is_unload = facts.is_load and _is_zero_duration(keep_alive)
    for key in _NATIVE_SCALARS:
        if top.get(key) is not None:
            extra[key] = small(top[key])
    fmt = top.get("format")
    if fmt is not None and fmt != "":
        extra["format"] = small(fmt) if isinstance(fmt, str) else "schema" if isinstance(fmt, dict) else "?"
    options = top.get("options")
    if isinstance(options, dict):
        _fill_options(facts, options)
    elif options is not None:
        extra["options"] = small(options)


def _fill_options(facts: RequestFacts, options: dict[str, Any]) -> None:
    extra = facts.extra
    for key, value in options.items():
        if value is None:
            continue  # FromMap skips nil values
        target = _OPTION_FIELDS.get(key)
        if target is not None:
            number = go_number(value, target[1], truncate=True)
            if number is not None:
                setattr(facts, target[0], number)
                continue
        elif key == "stop":
            stop = stop_list(value)
            if stop is not None:
                facts.stop = stop
                continue
        extra[f"options.{key}"] = small(value)


def _fill_openai(facts: RequestFacts, flavor: Flavor, top: dict[str, Any]) -> None:
    extra = facts.extra
    if flavor is Flavor.OPENAI_CHAT:
        messages = top.get("messages")
        parts, images = _message_texts(messages, flavor) if isinstance(messages, list) else ([], 0)
        facts.turns = sum(isinstance(m, dict) for m in messages) if isinstance(messages, list) else 0
        if images:
            extra["images"] = images
    elif flavor is Flavor.OPENAI_COMPLETION:
        parts = [s for s in (top.get("prompt"), top.get("suffix")) if isinstance(s, str) and s]
        facts.turns = 1
    else:
        parts = texts(top.get("input"))
    facts.prompt_text = "\n".join(parts)
    for key, (name, kind) in _V1_FIELDS.items():
        value = top.get(key)
        if value is None:
            continue
        number = go_number(value, kind, truncate=False)
        if number is None:
            extra[key] = small(value)
        else:
            setattr(facts, name, number)
    if top.get("stop") is not None:
        facts.stop = stop_list(top["stop"])
        if facts.stop is None:
            extra["stop"] = small(top["stop"])
    for key in _V1_SCALARS:
        if top.get(key) is not None:
            extra[key] = small(top[key])
    for key, inner, name in (
        ("reasoning", "effort", "reasoning_effort"),
        ("stream_options", "include_usage", "include_usage"),
        ("response_format", "type", "format"),
    ):
        value = top.get(key)
        if isinstance(value, dict):
            found = fold(value).get(inner)
            if found is not None:
                extra[name] = small(found)
