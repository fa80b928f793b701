"""The accumulator every framing feeds: raw text slices, counters, the final object, and the facts.

Text is kept as raw JSON string bodies (the bytes between the quotes, escapes untouched) and decoded once,
in ``facts()``: joining whole escape sequences gives a valid JSON string body again, so one ``orjson.loads``
replaces a decode per token. Objects that were parsed in full contribute their text re-encoded the same way,
so the order of text is kept whichever path a line took.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from proxy.forward.streams.facts import StreamFacts

__all__ = ["Collector", "string_end"]

logger = logging.getLogger(__name__)

_BACKSLASH = 0x5C
_NATIVE_METRICS = (
    ("prompt_eval_count", "prompt_eval_count"),
    ("eval_count", "eval_count"),
    ("total_duration", "total_duration_ns"),
    ("load_duration", "load_duration_ns"),
    ("prompt_eval_duration", "prompt_eval_duration_ns"),
    ("eval_duration", "eval_duration_ns"),
)
# Dropped from ``final``: vectors and token ids are bulky; text is private unless the operator stores it.
_NOT_IN_FINAL = frozenset(
    {"context", "embeddings", "embedding", "data", "response", "thinking", "message", "choices", "logprobs"}
)


def string_end(buf: bytes, q: int, end: int) -> int:
    """Index of the quote closing a JSON string whose body starts at ``q``, or -1 if not before ``end``.

    A quote is escaped exactly when an odd number of backslashes precede it.
    """
    i = buf.find(b'"', q, end)
    while i >= 0:
        if i == q or buf[i - 1] != _BACKSLASH:
            return i
        j = i - 1
        while j >= q and buf[j] == _BACKSLASH:
            j -= 1
        if (i - 1 - j) % 2 == 0:
            return i
        i = buf.find(b'"', i + 1, end)
    return -1


def _raw(text: str) -> bytes:
    """The JSON string body of ``text``: what the fast path would have sliced out of the wire."""
    return orjson.dumps(text)[1:-1]


# Response (and thinking) text kept per request, as JSON-escaped slices. Past it the slices are counted,
# not kept: a client that never reads, or a runaway generation, cannot make ollamon hold unbounded text.
MAX_TEXT_BYTES = 1 << 20


class TextSlices:
    """JSON-escaped text slices up to MAX_TEXT_BYTES; what does not fit is counted in ``dropped`` (escaped
    bytes, the base for scaling an estimate) and ``dropped_chars`` (characters, for ``response_length``)."""

    __slots__ = ("dropped", "dropped_chars", "parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = 0
        self.dropped_chars = 0

    def append(self, piece: bytes) -> None:
        n = len(piece)
        if self.size + n <= MAX_TEXT_BYTES:
            self.parts.append(piece)
            self.size += n
        else:
            self.dropped += n
            self.dropped_chars += _escaped_chars(piece)


def _escaped_chars(piece: bytes) -> int:
    """Characters in a JSON string body without decoding its escapes: ``\\uXXXX`` is one, ``\\n`` one, UTF-8
    sequences one each (an escaped backslash, ``\\\\``, is undercounted by one: rare in model output)."""
    backslashes = piece.count(b"\\")
    return len(piece.decode("utf-8", "replace")) - backslashes - 4 * piece.count(b"\\u")


def _decode(slices: list[bytes]) -> str:
    if not slices:
        return ""
    try:
        text = orjson.loads(b'"' + b"".join(slices) + b'"')
    except orjson.JSONDecodeError:
        # A garbage line got through the byte scan; decode slice by slice so the rest survives.
        parts = []
        for piece in slices:
            try:
                parts.append(str(orjson.loads(b'"' + piece + b'"')))
            except orjson.JSONDecodeError:
                parts.append(piece.decode("utf-8", "replace"))
        return "".join(parts)
    return str(text)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_text(err: Any) -> str:
    if isinstance(err, str):
        return err
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    return orjson.dumps(err).decode()


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in _NOT_IN_FINAL}


def _count_tool_calls(calls: list[Any]) -> int:
    """OpenAI streams may split one call over several deltas; only the first carries an ``id``."""
    with_id = sum(1 for c in calls if isinstance(c, dict) and c.get("id"))
    return with_id if with_id else len(calls)


class Collector:
    """Mutable state behind one parser; the framings call into it, ``facts()`` closes it."""

    __slots__ = (
        "done_reason",
        "embeddings",
        "error",
        "events",
        "final",
        "malformed",
        "metrics",
        "model",
        "model_raw",
        "terminal",
        "text",
        "thinking",
        "tool_calls",
        "tools",
        "usage_completion",
        "usage_prompt",
    )

    def __init__(self) -> None:
        self.text = TextSlices()
        self.thinking = TextSlices()
        self.events = 0
        self.tool_calls = 0
        self.tools = TextSlices()  # tool-call names and arguments, for the tool-call token estimate
        self.malformed = 0
        self.error: str | None = None
        self.terminal = False
        self.final: dict[str, Any] | None = None
        self.done_reason: str | None = None
        self.model: str | None = None
        self.model_raw: bytes | None = None
        self.metrics: dict[str, int | None] = {}
        self.usage_prompt: int | None = None
        self.usage_completion: int | None = None
        self.embeddings: int | None = None

    # -- objects parsed in full -------------------------------------------------------------------

    def set_error(self, err: Any) -> None:
        if self.error is None:  # the first error is the cause; later ones are fallout
            self.error = _error_text(err)

    def _add(self, target: TextSlices, value: Any) -> bool:
        if isinstance(value, str) and value:
            target.append(_raw(value))
            return True
        return False

    def add_tool(self, value: Any) -> None:
        """A tool call's name or arguments (a string, or an object written as compact JSON)."""
        if isinstance(value, str):
            self._add(self.tools, value)
        elif isinstance(value, dict | list) and value:
            self._add(self.tools, orjson.dumps(value).decode())

    def _add_calls(self, calls: list[Any]) -> None:
        """Native and OpenAI ``tool_calls``: each ``function``'s name and arguments."""
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                self.add_tool(fn.get("name"))
                self.add_tool(fn.get("arguments"))

    def absorb_native(self, obj: Any) -> int:
        """One native object (NDJSON line or JSON body); returns 1 if it carried content."""
        if not isinstance(obj, dict):
            self.malformed += 1
            return 0
        if obj.get("error") is not None:
            self.set_error(obj["error"])
            return 0
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        got = self._add(self.text, obj.get("response"))
        got = self._add(self.thinking, obj.get("thinking")) or got
        calls = obj.get("tool_calls")
        msg = obj.get("message")
        if isinstance(msg, dict):
            got = self._add(self.text, msg.get("content")) or got
            got = self._add(self.thinking, msg.get("thinking")) or got
            calls = msg.get("tool_calls") or calls
        if isinstance(calls, list) and calls:
            self.tool_calls += len(calls)
            self._add_calls(calls)
            got = True
        if obj.get("done") is True:
            self.terminal = True
            self.final = _strip(obj)
            reason = obj.get("done_reason")
            self.done_reason = reason if isinstance(reason, str) else None
            inference = self.done_reason not in ("load", "unload")
            for key, name in _NATIVE_METRICS:
                value = _int(obj.get(key))
                self.metrics[name] = value if value is not None or not inference else 0
        self._embeddings(obj)
        if got:
            self.events += 1
        return int(got)

    def _embeddings(self, obj: dict[str, Any]) -> None:
        vectors = obj.get("embeddings")
        if isinstance(vectors, list):
            self.embeddings = len(vectors)
            for key, name in _NATIVE_METRICS:
                if key in obj:
                    self.metrics[name] = _int(obj[key])
            self.final = _strip(obj)
        elif isinstance(obj.get("embedding"), list):
            self.embeddings = 1 if obj["embedding"] else 0
            self.final = _strip(obj)

    def absorb_openai(self, obj: Any, *, zero_usage_counts: bool = False) -> int:
        """One OpenAI object (SSE chunk or JSON body); returns 1 if it carried content.

        Streamed completions carry an all-zero ``usage`` on every chunk with include_usage; only a
        non-zero one is the real count, unless ``zero_usage_counts`` (a non-stream body) says otherwise.
        """
        if not isinstance(obj, dict):
            self.malformed += 1
            return 0
        if obj.get("error") is not None:
            self.set_error(obj["error"])
            return 0
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        got = False
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            got = self._add(self.text, choice.get("text")) or got
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")
            if isinstance(delta, dict):
                got = self._add(self.text, delta.get("content")) or got
                got = self._add(self.thinking, delta.get("reasoning")) or got
                calls = delta.get("tool_calls")
                if isinstance(calls, list) and calls:
                    self.tool_calls += _count_tool_calls(calls)
                    self._add_calls(calls)
                    got = True
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.done_reason = reason
                self.final = _strip(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
            if zero_usage_counts or prompt or completion:
                self.usage_prompt, self.usage_completion = prompt, completion
                self.final = _strip(obj)
        data = obj.get("data")
        if obj.get("object") == "list" and isinstance(data, list):
            self.embeddings = len(data)
            self.final = _strip(obj)
        if got:
            self.events += 1
        return int(got)

    def absorb_any(self, obj: Any, *, body: bool = False) -> int:
        """An object whose dialect is known only by its shape (fallbacks, JSON bodies)."""
        if isinstance(obj, dict) and ("choices" in obj or "object" in obj):
            return self.absorb_openai(obj, zero_usage_counts=body)
        return self.absorb_native(obj)

    # -- closing ------------------------------------------------------------------------------------

    def facts(self, framing: str, bytes_seen: int, *, capture_truncated: bool = False) -> StreamFacts:
        """Decode the text and freeze the facts; the expensive part, meant for a worker thread."""
        model = self.model
        if model is None and self.model_raw is not None:
            decoded = _decode([self.model_raw])
            model = decoded or None
        m = self.metrics
        return StreamFacts(
            framing=framing,
            complete=self.terminal and self.error is None,
            error_message=self.error,
            done_reason=self.done_reason,
            response_model=model,
            prompt_eval_count=m.get("prompt_eval_count"),
            eval_count=m.get("eval_count"),
            total_duration_ns=m.get("total_duration_ns"),
            load_duration_ns=m.get("load_duration_ns"),
            prompt_eval_duration_ns=m.get("prompt_eval_duration_ns"),
            eval_duration_ns=m.get("eval_duration_ns"),
            usage_prompt_tokens=self.usage_prompt,
            usage_completion_tokens=self.usage_completion,
            content_events=self.events,
            tool_calls=self.tool_calls,
            tool_call_text=_decode(self.tools.parts),
            response_text=_decode(self.text.parts),
            thinking_text=_decode(self.thinking.parts),
            text_dropped_bytes=self.text.dropped + self.thinking.dropped,
            response_dropped_chars=self.text.dropped_chars,
            text_kept_bytes=self.text.size + self.thinking.size,
            embeddings=self.embeddings,
            final=self.final,
            bytes_seen=bytes_seen,
            capture_truncated=capture_truncated,
            malformed_lines=self.malformed,
        )
