"""What one inference span says: an ``InferenceRecord`` turned into a name, times, attributes and events.

Pure and free of the OpenTelemetry SDK (which is an optional extra), so that the mapping can be read and
tested on its own; ``otel_export`` hands a ``SpanData`` to the SDK. Names follow the OpenTelemetry GenAI
semantic conventions (inference span: ``{gen_ai.operation.name} {gen_ai.request.model}``); figures that
the conventions do not name keep the record's own names under ``ollamon.`` (``ollamon.ttft_ms``), one
vocabulary with the API and docs/metrics.md. The operation names and ``error.type`` values are the
Prometheus export's (``prom_records``), so a span, a Prometheus series and an OTLP metric agree.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.exports.prom_records import OPERATION_NAMES, OTHER, PROVIDER, error_type
from storage.records import InferenceRecord

__all__ = ["MAX_NAME_CHARS", "MAX_TEXT_CHARS", "SpanData", "operation_name", "span_data"]

MAX_NAME_CHARS = 200  # a model name comes from the request: bound what it adds to a span name
MAX_TEXT_CHARS = 64 << 10  # per content attribute; the stored text may be longer
MAX_STATUS_CHARS = 500
_NS_PER_MS = 1_000_000


@dataclass(slots=True)
class SpanData:
    """Everything the SDK needs for one span; times are Unix nanoseconds."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None  # the status description when the request failed (status ERROR)
    trace_headers: dict[str, str] | None = None  # the caller's traceparent/tracestate, to extract


def operation_name(endpoint: str) -> str:
    """``gen_ai.operation.name`` for an instrumented route: the Prometheus export's table, one vocabulary."""
    return OPERATION_NAMES.get(endpoint, OTHER)


def _epoch_ns(timestamp: str) -> int:
    """The record's ISO-8601 UTC timestamp (millisecond precision) as Unix nanoseconds."""
    dt = _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return round(dt.timestamp() * 1000) * _NS_PER_MS


def _set(attrs: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        attrs[key] = value


def _content(rec: InferenceRecord, operation: str, attrs: dict[str, Any]) -> None:
    """Opt-in content attributes (JSON strings, as the conventions allow on spans). ollamon keeps the
    request's text flattened (all messages joined), so the input is one user message of that text."""
    if rec.prompt_text:
        message = {"role": "user", "parts": [{"type": "text", "content": rec.prompt_text[:MAX_TEXT_CHARS]}]}
        attrs["gen_ai.input.messages"] = orjson.dumps([message]).decode()
    if rec.response_text is not None and operation != "embeddings":
        out = {
            "role": "assistant",
            "parts": [{"type": "text", "content": rec.response_text[:MAX_TEXT_CHARS]}],
            "finish_reason": rec.done_reason or ("stop" if rec.success else "error"),
        }
        attrs["gen_ai.output.messages"] = orjson.dumps([out]).decode()


def span_data(
    rec: InferenceRecord,
    *,
    server_address: str,
    server_port: int,
    with_content: bool,
) -> SpanData:
    """The span for one committed record. ``with_content`` adds prompt and response text when the record
    carries them (``storage.store_text``)."""
    operation = operation_name(rec.endpoint)
    meta = rec.metadata or {}
    requested = meta.get("model_as_sent", rec.model_name)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": PROVIDER,
        "server.address": server_address,
        "server.port": server_port,
        "ollamon.request_id": rec.request_id,
        "ollamon.endpoint": rec.endpoint,
    }
    _set(attrs, "gen_ai.request.model", requested if isinstance(requested, str) else None)
    _set(attrs, "gen_ai.response.model", rec.model_name)
    _set(attrs, "gen_ai.usage.input_tokens", rec.prompt_tokens)
    if operation != "embeddings":
        _set(attrs, "gen_ai.usage.output_tokens", rec.completion_tokens)
    if rec.done_reason:
        attrs["gen_ai.response.finish_reasons"] = [rec.done_reason]
    _set(attrs, "gen_ai.request.temperature", rec.temperature)
    _set(attrs, "gen_ai.request.top_p", rec.top_p)
    _set(attrs, "gen_ai.request.max_tokens", rec.max_tokens)
    _set(attrs, "gen_ai.request.seed", rec.seed)
    if rec.top_k is not None:
        attrs["gen_ai.request.top_k"] = float(rec.top_k)  # a double in the conventions
    if rec.stop:
        attrs["gen_ai.request.stop_sequences"] = list(rec.stop)
    _set(attrs, "http.response.status_code", rec.status_code)
    _set(attrs, "ollamon.ttft_ms", rec.ttft_ms)
    _set(attrs, "ollamon.queue_time_ms", rec.queue_time_ms)
    _set(attrs, "ollamon.load_duration_ms", rec.load_duration_ms)
    _set(attrs, "ollamon.tokens_per_second", rec.tokens_per_second)
    _set(attrs, "ollamon.token_source", rec.token_source)
    _set(attrs, "ollamon.model_version", rec.model_version)
    _set(attrs, "ollamon.energy_j", rec.energy_j)
    if rec.stream is not None:
        attrs["ollamon.stream"] = rec.stream
    error = error_type(rec)  # the Prometheus export's error_type label, one vocabulary
    if error:
        attrs["error.type"] = error
    if with_content:
        _content(rec, operation, attrs)

    start = _epoch_ns(rec.timestamp)
    end = start + round((rec.response_time_ms or 0.0) * _NS_PER_MS)
    events: list[tuple[str, int, dict[str, Any]]] = []
    if rec.ttft_ms is not None:
        at = min(end, start + round(rec.ttft_ms * _NS_PER_MS))
        events.append(("gen_ai.first_token", at, {"ollamon.ttft_ms": rec.ttft_ms}))
    model = requested if isinstance(requested, str) and requested else None
    name = f"{operation} {model[:MAX_NAME_CHARS]}" if model else operation
    status = (rec.error_message or error)[:MAX_STATUS_CHARS] if error else None
    return SpanData(name, start, end, attrs, events, status, rec.trace_headers)
