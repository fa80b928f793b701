"""Plain records with units in their names: what the writer persists.

An ``InferenceRecord`` is one row of ``inference_metrics``; its field names are the column names, in
column order. An ``ErrorRecord`` is one row of ``error_metrics``. Timestamps are ISO-8601 UTC strings with
milliseconds and ``Z``; durations are milliseconds as floats; token counts are ints.

Producers do not always hand the writer a finished record: the proxy hands it a ``RecordSource`` whose
``build()`` does the expensive part (JSON decoding, token estimation) on the writer's worker thread, off
the request path. A finished record is its own source.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ERROR_COLUMNS",
    "INFERENCE_COLUMNS",
    "ErrorRecord",
    "InferenceRecord",
    "Record",
    "RecordSource",
    "iso_utc",
    "stamp_instance",
]


_SECOND_TEXT: dict[int, str] = {}  # "2026-11-26T23:07:38." by Unix second: every record formats 2 stamps


def iso_utc(epoch_s: float) -> str:
    """Format a Unix time as ISO-8601 UTC with milliseconds and a ``Z``: ``2026-11-26T23:07:38.123Z``.

    Exactly what ``datetime.fromtimestamp(epoch_s, UTC)`` gives (microseconds rounded half to even, as it
    rounds them), with the formatted second cached: strftime is most of the cost and records come in
    bursts within a second."""
    frac, whole = math.modf(epoch_s)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole, us = whole + 1.0, us - 1_000_000
    elif us < 0:
        whole, us = whole - 1.0, us + 1_000_000
    second = int(whole)
    head = _SECOND_TEXT.get(second)
    if head is None:
        head = _dt.datetime.fromtimestamp(second, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        if len(_SECOND_TEXT) >= 4096:
            _SECOND_TEXT.clear()
        _SECOND_TEXT[second] = head
    return f"{head}{us // 1000:03d}Z"


@dataclass(slots=True)
class ErrorRecord:
    """One row of ``error_metrics``. ``stack_trace`` only for ollamon's own exceptions."""

    timestamp: str
    request_id: str | None
    error_type: str
    error_message: str
    stack_trace: str | None = None
    model_name: str | None = None
    endpoint: str | None = None
    user_id: str | None = None
    severity: str = "error"  # info | warning | error | critical
    api_key_id: str | None = None  # the caller's API key id (never the key), docs/usage.md
    team: str | None = None
    upstream: str | None = None  # the Ollama host tried last, by name (docs/upstreams.md)
    instance: str | None = None  # the ollamon instance that wrote it (server.instance), stamped by the writer

    def build(self) -> ErrorRecord:
        return self


@dataclass(slots=True)
class InferenceRecord:
    """One row of ``inference_metrics`` (docs/metrics.md defines every field)."""

    timestamp: str
    request_id: str
    model_name: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    response_time_ms: float | None = None
    queue_time_ms: float | None = None
    processing_time_ms: float | None = None
    tokens_per_second: float | None = None
    prompt_length: int | None = None
    response_length: int | None = None
    success: bool = True
    error_message: str | None = None
    model_version: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    metadata: dict[str, Any] | None = None
    endpoint: str = ""
    status_code: int | None = None
    stream: bool | None = None
    ttft_ms: float | None = None
    itl_mean_ms: float | None = None
    itl_p95_ms: float | None = None
    itl_max_ms: float | None = None
    load_duration_ms: float | None = None
    prompt_eval_duration_ms: float | None = None
    eval_duration_ms: float | None = None
    total_duration_ms: float | None = None
    done_reason: str | None = None
    cancelled: bool = False
    token_source: str | None = None  # ollama | usage | estimate
    client_addr: str | None = None
    user_agent: str | None = None
    user_id: str | None = None
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    num_ctx: int | None = None
    stop: list[str] | None = None
    energy_j: float | None = None
    gpu_memory_peak_mb: float | None = None
    cloud: bool = False  # the model name has an explicit cloud source: Ollama ran it on ollama.com
    audio_seconds: float | None = None  # /v1/audio/transcriptions: the WAV upload's playing time
    api_key_id: str | None = None  # the caller's API key id (never the key), docs/usage.md
    team: str | None = None
    # What the request was charged when it was recorded (docs/usage.md, "Cost"); prices changed later
    # never rewrite these.
    cost_usd: float | None = None
    cloud_equiv_usd: float | None = None
    energy_cost_usd: float | None = None
    # Conversations (docs/conversations.md): the id and user turn; the prompt tokens Ollama took from its
    # cache versus evaluated anew (estimates); thinking and tool-call tokens of the response (estimates).
    conversation_id: str | None = None
    turn: int | None = None
    prompt_cached_tokens: int | None = None
    prompt_new_tokens: int | None = None
    thinking_tokens: int | None = None
    tool_call_tokens: int | None = None
    # The Ollama host that answered (or failed it last), by its upstreams name (docs/upstreams.md): with
    # one upstream, its host:port. None when no host was tried (a refused request).
    upstream: str | None = None
    # The ollamon instance that wrote the record (``server.instance``, docs/storage.md): stamped by the
    # writer (storage/writer.py) on every record it stores, so no producer has to.
    instance: str | None = None
    # Text is stored only when ``storage.store_text`` is on; these two are not columns of
    # inference_metrics but of the optional ``request_text`` table.
    prompt_text: str | None = None
    response_text: str | None = None
    # Not a column: the matching error_metrics row, when the request failed.
    error: ErrorRecord | None = None
    # Not a column, never stored: the caller's W3C trace context headers (``traceparent`` and, when sent,
    # ``tracestate``) as received, so an export can join the caller's trace (proxy/exports/otel.py).
    trace_headers: dict[str, str] | None = None
    # Not a column, never stored: (prompt, response) text for the content analyzer, set only when
    # content.enabled (proxy/content/); kept out of repr so a logged record never shows it.
    content_text: tuple[str | None, str | None] | None = dataclasses.field(default=None, repr=False)

    def build(self) -> InferenceRecord:
        return self


_NOT_COLUMNS = {"prompt_text", "response_text", "error", "trace_headers", "content_text"}
INFERENCE_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(InferenceRecord) if f.name not in _NOT_COLUMNS
)
ERROR_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ErrorRecord))


def stamp_instance(records: Iterable[object], instance: str) -> None:
    """Set ``instance`` on every inference and error record (an attached ``error`` too) that has none."""
    for r in records:
        if type(r) is InferenceRecord:
            if r.instance is None:
                r.instance = instance
            if r.error is not None and r.error.instance is None:
                r.error.instance = instance
        elif type(r) is ErrorRecord and r.instance is None:
            r.instance = instance


@runtime_checkable
class Record(Protocol):
    """A finished record: a dataclass that is its own source. The store dispatches on its type
    (``InferenceRecord`` and ``ErrorRecord`` built in; other features register theirs with
    ``SQLiteStore.register``)."""

    def build(self) -> Record: ...


@runtime_checkable
class RecordSource(Protocol):
    """Anything the writer can queue: ``build()`` runs on a worker thread and returns the record."""

    def build(self) -> Record: ...
