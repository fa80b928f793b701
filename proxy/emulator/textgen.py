"""Deterministic stand-ins for a model: tokens from a hash of the prompt, prompt token counts, vectors.

Same input, same output, so tests can assert exact text; the word list holds ``<``, ``>`` and ``&`` so
Go's escaping shows up in ordinary streams.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import time
from collections.abc import Iterable
from typing import Any

from .gojson import Float32

__all__ = [
    "WORDS",
    "chat_prompt_tokens",
    "context_ids",
    "count_words",
    "embedding",
    "go_time",
    "legacy_embedding",
    "now_rfc3339",
    "seed_of",
    "token_text",
]

WORDS = (
    "The sky is blue because sunlight scatters off molecules in the air and shorter wavelengths "
    "scatter more than longer ones so we see blue light from every direction during the day while "
    "sunsets look red R&D says <b>bold</b> a>b models answer questions with tokens one at a time"
).split()


def seed_of(*parts: str) -> int:
    """A stable 64-bit seed from text (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def token_text(seed: int, index: int) -> str:
    """The ``index``-th token for a prompt seed: a word, with a leading space after the first."""
    word = WORDS[(seed + index * 7919) % len(WORDS)]
    return word if index == 0 else " " + word


def count_words(text: str) -> int:
    return len(text.split())


def chat_prompt_tokens(messages: Iterable[Any], system: str = "") -> int:
    """Template overhead (a few tokens per message) plus the words of every message's content."""
    total = 2 + (count_words(system) + 4 if system else 0)
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += 4 + (count_words(content) if isinstance(content, str) else 0)
    return total


def message_part(role: Any, content: Any) -> tuple[str, int]:
    """A chat message as one prefix-cache part: a fingerprint and its ``chat_prompt_tokens`` share."""
    text = content if isinstance(content, str) else ""
    return hashlib.sha256(f"{role}\0{text}".encode()).hexdigest()[:16], 4 + count_words(text)


def prompt_parts(messages: list[Any]) -> tuple[tuple[str, int], ...]:
    """A chat prompt as prefix-cache parts (template overhead first); the tokens sum to
    ``chat_prompt_tokens(messages)``."""
    return (("<template>", 2), *(message_part(m.get("role"), m.get("content")) for m in messages))


def context_ids(seed: int, count: int) -> list[int]:
    """The deprecated ``context`` array: one id per prompt+response token."""
    return [(seed >> (i % 32)) % 32000 + i % 7 + 1 for i in range(count)]


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit-length float32 vector derived from ``text`` (``/api/embed`` normalises)."""
    raw = _raw_vector(text, dimensions)
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [Float32(x / norm) for x in raw]


def legacy_embedding(text: str, dimensions: int) -> list[float]:
    """Un-normalised float64 values, as the legacy ``/api/embeddings`` returns."""
    return [x * 3.0 for x in _raw_vector(text, dimensions)]


def _raw_vector(text: str, dimensions: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < dimensions:
        block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    return out[:dimensions]


def go_time(moment: _dt.datetime) -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, ``Z`` for UTC (Go's ``time.Time`` JSON form)."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    offset = moment.utcoffset() or _dt.timedelta(0)
    if offset == _dt.timedelta(0):
        zone = "Z"
    else:
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{base}{'.' + fraction if fraction else ''}{zone}"


def now_rfc3339() -> str:
    """``created_at``: UTC now with nanosecond digits, as Ollama on Linux prints it."""
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{base}{'.' + fraction if fraction else ''}Z"
