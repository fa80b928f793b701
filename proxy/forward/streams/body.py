"""Whole-body responses: ``stream:false`` JSON, embeddings, error bodies, gin's text/plain 404s.

``feed`` only keeps the chunks (up to ``max_body_bytes``); ``finish`` parses once. Embedding bodies can be
megabytes, so past the cap the parser keeps counting bytes and brackets, remembers the last few KB, and
``finish`` pulls the numbers that sit at the end of those bodies (``total_duration``, ``usage``…) out of
that tail with a byte regex; ``capture_truncated`` says the body was not parsed.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.forward.streams.collect import Collector
from proxy.forward.streams.facts import Flavor, StreamFacts
from proxy.forward.streams.messages import absorb_message_body
from proxy.forward.streams.responses import absorb_response_body
from proxy.forward.streams.transcription import transcription_facts

__all__ = ["BodyParser"]

_TAIL = 4096
_ERROR_CHARS = 500
_METRIC_RE = re.compile(
    rb'"(total_duration|load_duration|prompt_eval_count|prompt_eval_duration|eval_count|eval_duration'
    rb'|prompt_tokens|completion_tokens|input_tokens|output_tokens)":(\d+)'
)
_MODEL_RE = re.compile(rb'"model":"((?:[^"\\]|\\.)*)"')
_METRIC_NAMES = {
    b"total_duration": "total_duration_ns",
    b"load_duration": "load_duration_ns",
    b"prompt_eval_count": "prompt_eval_count",
    b"prompt_eval_duration": "prompt_eval_duration_ns",
    b"eval_count": "eval_count",
    b"eval_duration": "eval_duration_ns",
}


class BodyParser:
    """Accumulate, then parse in ``finish``; ``feed`` returns 0 (no event completes before the end)."""

    __slots__ = ("_brackets", "_cap", "_facts", "_flavor", "_parts", "_size", "_tail", "_truncated")

    def __init__(self, flavor: Flavor, max_body_bytes: int) -> None:
        self._flavor = flavor
        self._cap = max_body_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._truncated = False
        self._tail = b""
        self._brackets = [0, 0]  # "[" and "{" seen past the cap
        self._facts: StreamFacts | None = None

    def feed(self, chunk: bytes) -> int:
        """Keep ``chunk`` (never modified) while under the cap; past it, count and keep only the tail."""
        n = len(chunk)
        if not self._truncated and self._size + n <= self._cap:
            self._parts.append(chunk)
            self._size += n
            return 0
        self._truncated = True
        self._size += n
        self._brackets[0] += chunk.count(b"[")
        self._brackets[1] += chunk.count(b"{")
        self._tail = bytes(chunk[-_TAIL:]) if n >= _TAIL else (self._tail + chunk)[-_TAIL:]
        return 0

    def finish(self) -> StreamFacts:
        """Parse the body once (worker thread); idempotent."""
        if self._facts is None:
            self._facts = self._truncated_facts() if self._truncated else self._parsed_facts()
        return self._facts

    def _parsed_facts(self) -> StreamFacts:
        body = b"".join(self._parts)
        if self._flavor is Flavor.OPENAI_TRANSCRIPTION:
            return transcription_facts(body, self._size)
        c = Collector()
        try:
            obj: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", "replace").strip()[:_ERROR_CHARS]
            c.error = text or None
            return c.facts("other", self._size)
        if self._flavor is Flavor.ANTHROPIC_MESSAGES:
            absorb_message_body(c, obj)
        elif self._flavor is Flavor.OPENAI_RESPONSES:
            absorb_response_body(c, obj)
        else:
            c.absorb_any(obj, body=True)
        c.malformed = 0  # a body that is JSON but not an object (``null``) is not a malformed line
        c.terminal = True
        return c.facts("json", self._size)

    def _truncated_facts(self) -> StreamFacts:
        head = b"".join(self._parts)
        tail = self._tail
        c = Collector()
        for key, value in _METRIC_RE.findall(tail):
            if key in (b"prompt_tokens", b"input_tokens"):
                c.usage_prompt = int(value)
            elif key in (b"completion_tokens", b"output_tokens"):
                c.usage_completion = int(value)
            else:
                c.metrics[_METRIC_NAMES[key]] = int(value)
        models = _MODEL_RE.findall(tail) or _MODEL_RE.findall(head)
        if models:
            c.model_raw = models[-1]
        brackets = self._brackets[0] + head.count(b"[")
        braces = self._brackets[1] + head.count(b"{")
        if self._flavor is Flavor.EMBED:
            c.embeddings = max(brackets - 1, 0)  # {"embeddings":[[…],[…]]}: one outer list
        elif self._flavor is Flavor.OPENAI_EMBEDDINGS:
            c.embeddings = max(braces - 2, 0)  # the body and "usage" are objects; each vector is one
        elif self._flavor is Flavor.EMBEDDINGS:
            c.embeddings = 1
        c.terminal = head.lstrip().startswith(b"{") and tail.rstrip().endswith(b"}")
        return c.facts("json", self._size, capture_truncated=True)
