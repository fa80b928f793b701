"""Reading a request's JSON the way Ollama's Go server does, and the ``RequestFacts`` it yields.

Go's ``encoding/json`` matches struct keys case-insensitively (``"Model"`` works), lets the last duplicate
win, decodes only the first JSON value in the body and ignores Content-Type; the helpers here do the same
(``fold``, ``slow_parse``), so the record describes what Ollama actually did. Shared by the per-API readers
(``request_facts`` for the native and OpenAI routes, ``request_agents`` for Messages and Responses,
``request_audio`` for the multipart transcription route).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "NeedsOrder",
    "RequestFacts",
    "clean",
    "fold",
    "go_number",
    "set_numbers",
    "slow_parse",
    "small",
    "stop_list",
    "texts",
]

_SMALL_STR = 64
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


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
    turns: int = 0  # messages the chat template wraps (1 for a generate prompt): calibration's feature
    audio_seconds: float | None = None  # /v1/audio/transcriptions: a WAV file part's playing time
    opening: tuple[str, int] | None = None  # chat routes: (hash of the opening messages, user turn)


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


class NeedsOrder(Exception):
    """Two keys differ only by case; which one Go keeps depends on an order orjson did not keep."""


def fold(obj: dict[str, Any]) -> dict[str, Any]:
    """Keys folded Go-style, the last duplicate winning."""
    if isinstance(obj, _Pairs):
        return {_fold_key(key): value for key, value in obj.pairs}
    out = {_fold_key(key): value for key, value in obj.items()}
    if len(out) < len(obj):
        raise NeedsOrder
    return out


def small(value: Any) -> Any:
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


def go_number(value: Any, kind: str, *, truncate: bool) -> int | float | None:
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


def stop_list(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    return None


def texts(value: Any) -> list[str]:
    """A string, or the strings of a list (embedding inputs); anything else reads as nothing."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str) and s]
    return []


def slow_parse(body: bytes) -> Any:
    """Go's reading where orjson differs: the first value only, invalid UTF-8 as U+FFFD, pairs in order."""
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    decoder = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)
    return decoder.raw_decode(text)[0]


def clean(text: str) -> str:
    """Lone surrogates (``"\\ud800"``) become U+FFFD, as Go decodes them; they cannot be stored as UTF-8."""
    return _SURROGATE_RE.sub("\ufffd", text)


def set_numbers(facts: RequestFacts, top: dict[str, Any], fields: dict[str, tuple[str, str]]) -> None:
    for key, (name, kind) in fields.items():
        value = top.get(key)
        if value is None:
            continue
        number = go_number(value, kind, truncate=False)
        if number is None:
            facts.extra[key] = small(value)
        else:
            setattr(facts, name, number)
