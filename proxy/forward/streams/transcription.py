"""Answers of ``/v1/audio/transcriptions``: ``{"text": ...}`` JSON or the bare transcript as text/plain.

Ollama answers JSON for ``response_format`` json / verbose_json and plain text otherwise (spec §2); errors
use the OpenAI envelope ``{"error":{"message",...}}``. The transcript is the response text (its characters
are ``response_length``); an OpenAI-style ``usage`` with ``input_tokens`` / ``output_tokens`` is taken when
present. A body that is not JSON is the transcript itself.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.forward.streams.collect import Collector
from proxy.forward.streams.facts import StreamFacts

__all__ = ["transcription_facts"]

_TEXT_KEYS = frozenset({"text", "segments", "words"})  # transcript-bearing: never in ``final``


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def transcription_facts(body: bytes, size: int) -> StreamFacts:
    """Facts of one complete transcription answer (worker thread)."""
    c = Collector()
    c.terminal = True
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace")
        if text:
            c.text.append(orjson.dumps(text)[1:-1])
            c.events = 1
        return c.facts("other", size)
    if not isinstance(obj, dict):
        c.malformed = 1
        return c.facts("json", size)
    if obj.get("error") is not None:
        c.set_error(obj["error"])
        return c.facts("json", size)
    transcript = obj.get("text")
    if isinstance(transcript, str) and transcript:
        c.text.append(orjson.dumps(transcript)[1:-1])
        c.events = 1
    usage = obj.get("usage")
    if isinstance(usage, dict):
        prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        if prompt is not None:
            c.usage_prompt, c.usage_completion = prompt, completion
    c.final = {k: v for k, v in obj.items() if k not in _TEXT_KEYS}
    return c.facts("json", size)
