"""The request side: what a client asked for, read the way Ollama's Go server reads it (spec §1, §3, §8).

Go's ``encoding/json`` matches struct keys case-insensitively (``"Model"`` works), lets the last duplicate
win, decodes only the first JSON value in the body and ignores Content-Type; this module does the same, so
the record describes what Ollama actually did. ``options`` is a ``map[string]any`` checked by
``Options.FromMap`` with exact key lookups, so option keys are case-sensitive. Nothing here raises: an
unreadable body gives ``parse_error`` (the request is forwarded anyway; Ollama judges it), a wrongly typed
field gives ``None`` with the raw value kept, small, in ``extra``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.forward.streams.facts import Flavor

__all__ = ["RequestFacts", "inspect_request"]

logger = logging.getLogger(__name__)

_NATIVE = frozenset({Flavor.GENERATE, Flavor.CHAT, Flavor.EMBED, Flavor.EMBEDDINGS})
_EMBEDDING = frozenset({Flavor.EMBED, Flavor.EMBEDDINGS, Flavor.OPENAI_EMBEDDINGS})
_STREAMING = frozenset({Flavor.GENERATE, Flavor.CHAT})  # native default; /v1 defaults to false
_SMALL_STR = 64
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
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


@dataclass(slots=True)
class RequestFacts:
    """What the client sent, as Ollama would read it; ``extra`` holds small values for metadata only."""

    model: str | None = None
    stream: bool = False
    parse_error: str | None = None
    prompt_text: str = ""
    prompt_chars: int = 0
    is_load: bool = False
    is_unload: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    num_ctx: int | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Pairs(dict[str, Any]):
    """A JSON object that remembers every key/value pair in order, duplicates included."""

    pairs: list[tuple[str, Any]]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    obj.pairs = pairs
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _fold_key(key: str) -> str:
    # Go's EqualFold uses simple case folding: long s (U+017F) matches "s", Kelvin sign (U+212A) "k"
    return key.lower().replace("\u017f", "s")


class _NeedsOrder(Exception):
    """Two keys differ only by case; which one Go keeps depends on an order orjson did not keep."""


def _fold(obj: dict[str, Any]) -> dict[str, Any]:
    """Keys folded Go-style, the last duplicate winning."""
    if isinstance(obj, _Pairs):
        return {_fold_key(key): value for key, value in obj.pairs}
    out = {_fold_key(key): value for key, value in obj.items()}
    if len(out) < len(obj):
        raise _NeedsOrder
    return out


def _small(value: Any) -> Any:
    """A value fit for metadata: scalars as they are, long strings cut, containers summarised."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
        return str(value)  # beyond what JSON metadata (orjson) can hold
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= _SMALL_STR else value[:_SMALL_STR] + "…"
    if isinstance(value, list):
        return f"<array of {len(value)}>"
    return "<object>" if isinstance(value, dict) else repr(value)[:_SMALL_STR]


def _number(value: Any, kind: str, *, truncate: bool) -> int | float | None:
    """An int/float as Go would bind it; ``None`` for a wrong type (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if kind == "f":
        return float(value)
    if isinstance(value, int):
        return value
    return int(value) if truncate else None


def _stop(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    return None


def _is_zero_duration(value: Any) -> bool:
    """``keep_alive`` 0 means unload: a number of seconds that truncates to 0 ns, or a Go duration of 0."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value) and 0 <= value and int(value * 1e9) == 0
    if isinstance(value, str):
        return value in ("0", "+0", "-0") or _ZERO_DURATION_RE.fullmatch(value) is not None
    return False


def _texts(value: Any) -> list[str]:
    """A string, or the strings of a list (embedding inputs); anything else reads as nothing."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str) and s]
    return []


def _message_texts(messages: list[Any], flavor: Flavor) -> tuple[list[str], int]:
    """Content (string or text parts) and thinking of every message; also counts images."""
    thinking_key = "reasoning" if flavor is Flavor.OPENAI_CHAT else "thinking"
    parts: list[str] = []
    images = 0
    for raw in messages:
        if not isinstance(raw, dict):
            continue
        msg = _fold(raw)
        content = msg.get("content")
        if isinstance(content, str):
            parts.extend(_texts(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    folded = _fold(part)
                    parts.extend(_texts(folded.get("text")))
                    images += folded.get("type") == "image_url"
        parts.extend(_texts(msg.get(thinking_key)))
        if isinstance(msg.get("images"), list):
            images += len(msg["images"])
    return parts, images


def _slow_parse(body: bytes) -> Any:
    """Go's reading where orjson differs: the first value only, invalid UTF-8 as U+FFFD, pairs in order."""
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    decoder = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)
    return decoder.raw_decode(text)[0]


def _clean(text: str) -> str:
    """Lone surrogates (``"\\ud800"``) become U+FFFD, as Go decodes them; they cannot be stored as UTF-8."""
    return _SURROGATE_RE.sub("\ufffd", text)


def inspect_request(flavor: Flavor, body: bytes) -> RequestFacts:
    """Read a request body for ``flavor``; never raises."""
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
            obj = _slow_parse(body)
        if not isinstance(obj, dict):
            facts.parse_error = f"body is JSON {type(obj).__name__}, not an object"
            return facts
        try:
            _fill(facts, flavor, obj)
        except _NeedsOrder:
            slow = True
            facts = RequestFacts(stream=flavor in _STREAMING)
            _fill(facts, flavor, _slow_parse(body))
    except (ValueError, RecursionError) as exc:
        facts.parse_error = f"body is not JSON: {str(exc)[:200]}"
        return facts
    except Exception as exc:  # a bug here must not cost the request its record
        logger.exception("inspect_request failed for %s", flavor.name)
        facts.parse_error = f"ollamon could not inspect the body: {exc!r}"[:300]
    if slow:
        facts.prompt_text = _clean(facts.prompt_text)
        facts.model = _clean(facts.model) if facts.model is not None else None
        facts.stop = [_clean(s) for s in facts.stop] if facts.stop is not None else None
    facts.prompt_chars = len(facts.prompt_text)
    return facts


def _fill(facts: RequestFacts, flavor: Flavor, obj: dict[str, Any]) -> None:
    top = _fold(obj)
    extra = facts.extra
    model = top.get("model")
    if isinstance(model, str):
        facts.model = model
    elif model is not None:
        extra["model"] = _small(model)
    stream = top.get("stream")
    if isinstance(stream, bool) and flavor not in _EMBEDDING:
        facts.stream = stream
    elif stream is not None:
        extra["stream"] = _small(stream)
    if isinstance(top.get("tools"), list):
        extra["tools"] = len(top["tools"])
    if flavor in _NATIVE:
        _fill_native(facts, flavor, top)
    elif flavor is Flavor.ANTHROPIC_MESSAGES:
        _fill_messages(facts, top)
    elif flavor is Flavor.OPENAI_RESPONSES:
        _fill_responses(facts, top)
    else:
        _fill_openai(facts, flavor, top)


def _fill_native(facts: RequestFacts, flavor: Flavor, top: dict[str, Any]) -> None:
    extra = facts.extra
    parts: list[str] = []
    images = 0
    # A load is an empty/absent prompt, messages or input; a wrongly typed one is a 400, not a load.
    if flavor is Flavor.GENERATE:
        for key in ("system", "prompt", "suffix"):
            value = top.get(key)
            if isinstance(value, str):
                parts.extend(_texts(value))
            elif value is not None:
                extra[key] = _small(value)
        facts.is_load = top.get("prompt") in (None, "")
        if isinstance(top.get("images"), list):
            images = len(top["images"])
    elif flavor is Flavor.CHAT:
        messages = top.get("messages")
        if isinstance(messages, list):
            parts, images = _message_texts(messages, flavor)
        elif messages is not None:
            extra["messages"] = _small(messages)
        facts.is_load = messages is None or messages == []
    elif flavor is Flavor.EMBED:
        inp = top.get("input")
        parts = _texts(inp)
        facts.is_load = inp is None or inp == "" or inp == []
    else:  # legacy /api/embeddings
        prompt = top.get("prompt")
        parts = _texts(prompt) if isinstance(prompt, str) else []
        facts.is_load = prompt in (None, "")
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    keep_alive = top.get("keep_alive")
    if keep_alive is not None:
        extra["keep_alive"] = _small(keep_alive)
    facts.is_unload = facts.is_load and _is_zero_duration(keep_alive)
    for key in _NATIVE_SCALARS:
        if top.get(key) is not None:
            extra[key] = _small(top[key])
    fmt = top.get("format")
    if fmt is not None and fmt != "":
        extra["format"] = _small(fmt) if isinstance(fmt, str) else "schema" if isinstance(fmt, dict) else "?"
    options = top.get("options")
    if isinstance(options, dict):
        _fill_options(facts, options)
    elif options is not None:
        extra["options"] = _small(options)


def _fill_options(facts: RequestFacts, options: dict[str, Any]) -> None:
    extra = facts.extra
    for key, value in options.items():
        if value is None:
            continue  # FromMap skips nil values
        target = _OPTION_FIELDS.get(key)
        if target is not None:
            number = _number(value, target[1], truncate=True)
            if number is not None:
                setattr(facts, target[0], number)
                continue
        elif key == "stop":
            stop = _stop(value)
            if stop is not None:
                facts.stop = stop
                continue
        extra[f"options.{key}"] = _small(value)


def _fill_openai(facts: RequestFacts, flavor: Flavor, top: dict[str, Any]) -> None:
    extra = facts.extra
    if flavor is Flavor.OPENAI_CHAT:
        messages = top.get("messages")
        parts, images = _message_texts(messages, flavor) if isinstance(messages, list) else ([], 0)
        if images:
            extra["images"] = images
    elif flavor is Flavor.OPENAI_COMPLETION:
        parts = [s for s in (top.get("prompt"), top.get("suffix")) if isinstance(s, str) and s]
    else:
        parts = _texts(top.get("input"))
    facts.prompt_text = "\n".join(parts)
    for key, (name, kind) in _V1_FIELDS.items():
        value = top.get(key)
        if value is None:
            continue
        number = _number(value, kind, truncate=False)
        if number is None:
            extra[key] = _small(value)
        else:
            setattr(facts, name, number)
    if top.get("stop") is not None:
        facts.stop = _stop(top["stop"])
        if facts.stop is None:
            extra["stop"] = _small(top["stop"])
    for key in _V1_SCALARS:
        if top.get(key) is not None:
            extra[key] = _small(top[key])
    for key, inner, name in (
        ("reasoning", "effort", "reasoning_effort"),
        ("stream_options", "include_usage", "include_usage"),
        ("response_format", "type", "format"),
    ):
        value = top.get(key)
        if isinstance(value, dict):
            found = _fold(value).get(inner)
            if found is not None:
                extra[name] = _small(found)


# Anthropic Messages / OpenAI Responses fields recorded as facts; Go binds *float64 / *int / int
_MESSAGES_FIELDS = {
    "temperature": ("temperature", "f"),
    "top_p": ("top_p", "f"),
    "top_k": ("top_k", "i"),
    "max_tokens": ("max_tokens", "i"),
}
_RESPONSES_FIELDS = {
    "temperature": ("temperature", "f"),
    "top_p": ("top_p", "f"),
    "max_output_tokens": ("max_tokens", "i"),
}


def _set_numbers(facts: RequestFacts, top: dict[str, Any], fields: dict[str, tuple[str, str]]) -> None:
    for key, (name, kind) in fields.items():
        value = top.get(key)
        if value is None:
            continue
        number = _number(value, kind, truncate=False)
        if number is None:
            facts.extra[key] = _small(value)
        else:
            setattr(facts, name, number)


def _block_texts(content: Any) -> tuple[list[str], int]:
    """A Messages/Responses content value: a string, or blocks whose text (and thinking) the model reads."""
    if isinstance(content, str):
        return _texts(content), 0
    parts: list[str] = []
    images = 0
    for raw in content if isinstance(content, list) else ():
        if not isinstance(raw, dict):
            continue
        block = _fold(raw)
        kind = block.get("type")
        if kind in ("image", "input_image"):
            images += 1
        parts.extend(_texts(block.get("text")))
        parts.extend(_texts(block.get("thinking")))
        if kind == "tool_result":
            inner, more = _block_texts(block.get("content"))
            parts.extend(inner)
            images += more
    return parts, images


def _fill_messages(facts: RequestFacts, top: dict[str, Any]) -> None:
    """``/v1/messages`` (anthropic.MessagesRequest): system + every message's blocks are the prompt."""
    extra = facts.extra
    parts, images = _block_texts(top.get("system"))
    messages = top.get("messages")
    for raw in messages if isinstance(messages, list) else ():
        if isinstance(raw, dict):
            more, n = _block_texts(_fold(raw).get("content"))
            parts.extend(more)
            images += n
    if messages is not None and not isinstance(messages, list):
        extra["messages"] = _small(messages)
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    _set_numbers(facts, top, _MESSAGES_FIELDS)
    stop = top.get("stop_sequences")
    if stop is not None:
        facts.stop = _stop(stop) if isinstance(stop, list) else None
        if facts.stop is None:
            extra["stop_sequences"] = _small(stop)
    for key, inner, name in (
        ("thinking", "type", "thinking"),
        ("thinking", "budget_tokens", "thinking_budget_tokens"),
        ("tool_choice", "type", "tool_choice"),
        ("output_config", "effort", "reasoning_effort"),
    ):
        value = top.get(key)
        if isinstance(value, dict):
            found = _fold(value).get(inner)
            if found is not None:
                extra[name] = _small(found)


def _fill_responses(facts: RequestFacts, top: dict[str, Any]) -> None:
    """``/v1/responses`` (openai.ResponsesRequest): instructions + input items are the prompt."""
    extra = facts.extra
    parts = _texts(top.get("instructions"))
    images = 0
    inp = top.get("input")
    if isinstance(inp, str):
        parts.extend(_texts(inp))
    elif isinstance(inp, list):
        for raw in inp:
            if not isinstance(raw, dict):
                continue
            item = _fold(raw)
            more, n = _block_texts(item.get("content"))
            parts.extend(more)
            images += n
            parts.extend(_texts(item.get("output")))  # function_call_output
            parts.extend(_texts(item.get("arguments")))  # function_call in the history
    elif inp is not None:
        extra["input"] = _small(inp)
    facts.prompt_text = "\n".join(parts)
    if images:
        extra["images"] = images
    _set_numbers(facts, top, _RESPONSES_FIELDS)
    for key in ("truncation", "background"):
        if top.get(key) is not None:
            extra[key] = _small(top[key])
    for key, inner, name in (("reasoning", "effort", "reasoning_effort"), ("text", "format", "format")):
        value = top.get(key)
        if isinstance(value, dict):
            found = _fold(value).get(inner)
            if isinstance(found, dict):
                found = _fold(found).get("type")
            if found is not None:
                extra[name] = _small(found)
