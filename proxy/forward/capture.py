"""What the proxy observes about one request, and how it becomes one InferenceRecord.

The request path only fills a ``Capture`` (timestamps and the parser fed with the bytes it forwarded);
``Capture.build()`` runs later on the writer's worker thread and does everything expensive: parsing the
request JSON, decoding the response text, estimating tokens. docs/metrics.md defines every number here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.content.tap import ContentTap
from proxy.forward.calibration import Calibration
from proxy.forward.conversations import Conversations
from proxy.forward.request_facts import RequestFacts, inspect_request
from proxy.forward.request_zstd import inflate, is_zstd
from proxy.forward.streams import Flavor, StreamFacts, StreamParser
from proxy.forward.token_counts import apply_tokens
from proxy.resources.energy import EnergySpan
from proxy.usage.cost import Pricing, apply_cost
from storage.histogram import exact_quantile
from storage.model_names import canonical_model_name, is_cloud_model
from storage.records import ErrorRecord, InferenceRecord, iso_utc

__all__ = ["Capture", "Failure", "ModelObserver"]

_NS_PER_MS = 1_000_000.0
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what an INTEGER column holds


class ModelObserver(Protocol):
    """The model inventory as the writer thread sees it (``proxy.resources.inventory.Inventory``)."""

    def observe(
        self, model_name: str, load_duration_ms: float | None, request_id: str, arrival_wall: float
    ) -> str | None:
        """The model's digest, or None when unknown; must be cheap and thread-safe."""


@dataclass(slots=True)
class Failure:
    """An error ollamon itself saw (the upstream's own errors come from the parser)."""

    error_type: str  # upstream_unreachable | upstream_timeout | upstream_closed | internal
    message: str
    severity: str = "error"
    stack_trace: str | None = None


class Capture:
    """Mutable facts gathered on the request path; ``build()`` turns them into records off the path."""

    __slots__ = (
        "admission",
        "api_key_id",
        "arrival",
        "arrival_wall",
        "body",
        "body_facts",
        "bytes_in",
        "bytes_out",
        "calibration",
        "cancelled",
        "client_addr",
        "content",
        "content_encoding",
        "content_times",
        "content_type",
        "conversation_header",
        "conversations",
        "endpoint",
        "energy",
        "failure",
        "flavor",
        "inspect_limit",
        "live_model",
        "models",
        "parser",
        "pricing",
        "request_id",
        "status",
        "store_text",
        "t_end",
        "t_headers",
        "t_sent",
        "team",
        "trace_headers",
        "upstream",
        "user_agent",
        "user_id",
    )

    def __init__(
        self,
        *,
        endpoint: str,
        flavor: Flavor,
        request_id: str,
        arrival: float,
        arrival_wall: float,
        client_addr: str | None,
        user_agent: str | None,
        user_id: str | None,
        store_text: bool,
    ) -> None:
        self.endpoint = endpoint
        self.flavor = flavor
        self.request_id = request_id
        self.arrival = arrival  # perf_counter at handler entry
        self.arrival_wall = arrival_wall  # time.time() at handler entry
        self.client_addr = client_addr
        self.user_agent = user_agent
        self.user_id = user_id
        self.store_text = store_text
        self.body: bytes | None = None  # request body, when small enough to inspect
        self.body_facts: RequestFacts | None = None  # set instead of ``body`` for large bodies
        self.bytes_in = 0
        self.bytes_out = 0
        self.t_sent: float | None = None  # just before the upstream call
        self.t_headers: float | None = None  # upstream response headers received
        self.t_end: float | None = None  # last byte handed to the client
        self.status: int | None = None
        self.parser: StreamParser | None = None
        self.content_times: list[float] = []
        self.cancelled = False
        self.failure: Failure | None = None
        self.energy: EnergySpan | None = None  # the energy meter's marks, final once the request ended
        self.models: ModelObserver | None = None  # the model inventory, for model_version
        self.content_encoding: str | None = None  # the request's Content-Encoding, as sent
        self.content_type: str | None = None  # the request's Content-Type: the multipart boundary
        self.calibration: Calibration | None = None  # the forwarder's learned estimate calibration
        self.pricing: Pricing | None = None  # usage prices (proxy/usage/cost.py), charged in build()
        self.content: ContentTap | None = None  # content.enabled: text for the analyzer, redaction
        self.inspect_limit = 16 << 20  # server.max_inspect_bytes: also bounds a decompressed body
        self.live_model: str | None = None  # learned by proxy/forward/live.py while the request is in flight
        self.trace_headers: dict[str, str] | None = None  # the caller's traceparent/tracestate, as sent
        self.api_key_id: str | None = None  # the caller's API key id (proxy/usage/gate.py), never the key
        self.team: str | None = None
        self.admission: object | None = None  # rate-limit slots held (proxy/usage/limits.py Admitted)
        self.conversations: Conversations | None = None  # conversation tracking, when on
        self.conversation_header: str | None = None  # the client's conversation id header, as sent
        self.upstream: str | None = None  # the Ollama host's name (proxy/upstreams/), set by the forwarder

    def build(self) -> InferenceRecord:
        """Assemble the record (worker thread)."""
        return _assemble(self)


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / _NS_PER_MS


def _request(cap: Capture, meta: dict[str, Any]) -> RequestFacts | None:
    """The request facts: already read on the request path, or read now; a zstd body is inflated first."""
    if cap.body_facts is not None or cap.body is None:
        return cap.body_facts
    if not is_zstd(cap.endpoint, cap.content_encoding):
        return inspect_request(cap.flavor, cap.body, cap.content_type)
    meta["content_encoding"] = "zstd"
    inflated = inflate(cap.body, cap.inspect_limit)
    if inflated.body is None:
        return RequestFacts(parse_error=inflated.error)  # /v1: stream defaults to false
    meta["bytes_inflated"] = len(inflated.body)
    return inspect_request(cap.flavor, inflated.body, cap.content_type)


def _assemble(cap: Capture) -> InferenceRecord:
    meta: dict[str, Any] = {"bytes_in": cap.bytes_in, "bytes_out": cap.bytes_out}
    req = _request(cap, meta)
    facts = cap.parser.finish() if cap.parser is not None else None
    end = cap.t_end if cap.t_end is not None else cap.arrival
    rec = InferenceRecord(
        timestamp=iso_utc(cap.arrival_wall),
        request_id=cap.request_id,
        endpoint=cap.endpoint,
        status_code=cap.status,
        response_time_ms=(end - cap.arrival) * 1000.0,
        cancelled=cap.cancelled,
        client_addr=cap.client_addr,
        user_agent=cap.user_agent,
        user_id=cap.user_id,
        api_key_id=cap.api_key_id,
        team=cap.team,
        upstream=cap.upstream,
    )
    ollamon_wait_ms = None if cap.t_sent is None else (cap.t_sent - cap.arrival) * 1000.0
    if ollamon_wait_ms is not None:
        meta["ollamon_wait_ms"] = round(ollamon_wait_ms, 3)
    if cap.t_headers is not None:
        meta["time_to_headers_ms"] = round((cap.t_headers - cap.arrival) * 1000.0, 3)
    if req is not None:
        _apply_request(rec, req, meta)
    if facts is not None:
        _apply_facts(rec, facts, meta)
        if rec.model_name is None:
            rec.model_name = facts.response_model
        _apply_timings(rec, cap, facts, ollamon_wait_ms)
    _canonical_model(rec, meta)
    apply_tokens(rec, req, facts, meta, cap.calibration)
    _apply_outcome(rec, cap, facts, req)
    if cap.conversations is not None:
        cap.conversations.apply(rec, req.opening if req is not None else None, cap.conversation_header, facts)
    if cap.store_text:
        rec.prompt_text = req.prompt_text if req is not None else None
        rec.response_text = facts.response_text if facts is not None else None
    if cap.content is not None:
        cap.content.apply(
            rec,
            req.prompt_text if req is not None else None,
            facts.response_text if facts is not None else None,
        )
    rec.metadata = meta
    rec.trace_headers = cap.trace_headers
    _apply_resources(rec, cap)
    apply_cost(rec, cap.pricing)
    return rec


def _canonical_model(rec: InferenceRecord, meta: dict[str, Any]) -> None:
    """``model_name`` is the name Ollama resolves (``llama3.2:latest``), as the inventory lists it, so every
    filter finds the row under either spelling; the client's own spelling is kept in ``model_as_sent``."""
    sent = rec.model_name
    canonical = canonical_model_name(sent)
    if canonical != sent:
        rec.model_name = canonical
        meta["model_as_sent"] = sent
    rec.cloud = is_cloud_model(rec.model_name)


def _apply_resources(rec: InferenceRecord, cap: Capture) -> None:
    """Energy and GPU memory from the meter's marks; the digest (and load events) via the inventory."""
    if cap.energy is not None:
        rec.energy_j = cap.energy.energy_j
        rec.gpu_memory_peak_mb = cap.energy.memory_peak_mb
    if cap.models is not None and rec.model_name:
        rec.model_version = cap.models.observe(
            rec.model_name, rec.load_duration_ms, cap.request_id, cap.arrival_wall
        )


def _int64(name: str, value: int | None, out_of_range: dict[str, str]) -> int | None:
    """``value`` when a 64-bit column holds it; else None, with its text kept in ``out_of_range``."""
    if value is None or _INT64_MIN <= value <= _INT64_MAX:
        return value
    out_of_range[name] = str(value)
    return None


def _apply_request(rec: InferenceRecord, req: RequestFacts, meta: dict[str, Any]) -> None:
    rec.model_name = req.model
    rec.stream = req.stream
    rec.prompt_length = req.prompt_chars
    rec.temperature = req.temperature
    rec.top_p = req.top_p
    rec.repeat_penalty = req.repeat_penalty
    # A client may send any integer ("seed": 10**30); Ollama answers, so the row must be written anyway.
    out_of_range: dict[str, str] = {}
    rec.max_tokens = _int64("max_tokens", req.max_tokens, out_of_range)
    rec.top_k = _int64("top_k", req.top_k, out_of_range)
    rec.seed = _int64("seed", req.seed, out_of_range)
    rec.num_ctx = _int64("num_ctx", req.num_ctx, out_of_range)
    if out_of_range:
        meta["out_of_range"] = out_of_range
    rec.stop = req.stop
    rec.audio_seconds = req.audio_seconds
    if req.extra:
        meta["request"] = req.extra
    if req.parse_error:
        meta["request_parse_error"] = req.parse_error


def _apply_facts(rec: InferenceRecord, facts: StreamFacts, meta: dict[str, Any]) -> None:
    meta["framing"] = facts.framing
    if facts.framing in ("ndjson", "sse"):
        rec.stream = True
    elif facts.framing == "json" and rec.status_code is not None and 200 <= rec.status_code < 300:
        rec.stream = False
    rec.done_reason = facts.done_reason
    rec.response_length = len(facts.response_text)
    if facts.text_dropped_bytes:
        # Characters past the cap counted from the escaped bytes without decoding them: exact but for an
        # escaped backslash or a character outside the BMP (rare in model output).
        rec.response_length += facts.response_dropped_chars
        meta["response_text_truncated_bytes"] = facts.text_dropped_bytes
    if facts.thinking_text:
        meta["thinking_length"] = len(facts.thinking_text)
    if facts.tool_calls:
        meta["tool_calls"] = facts.tool_calls
    if facts.embeddings is not None:
        meta["embeddings"] = facts.embeddings
    meta["content_events"] = facts.content_events
    if facts.capture_truncated:
        meta["capture_truncated"] = True
    malformed = getattr(facts, "malformed_lines", 0)
    if malformed:
        meta["malformed_lines"] = malformed
    counters = {
        "total_duration": facts.total_duration_ns,
        "load_duration": facts.load_duration_ns,
        "prompt_eval_count": facts.prompt_eval_count,
        "prompt_eval_duration": facts.prompt_eval_duration_ns,
        "eval_count": facts.eval_count,
        "eval_duration": facts.eval_duration_ns,
    }
    present = {k: v for k, v in counters.items() if v is not None}
    if present:
        meta["ollama"] = present
    rec.load_duration_ms = _ms(facts.load_duration_ns)
    rec.prompt_eval_duration_ms = _ms(facts.prompt_eval_duration_ns)
    rec.eval_duration_ms = _ms(facts.eval_duration_ns)
    rec.total_duration_ms = _ms(facts.total_duration_ns)


def _apply_timings(
    rec: InferenceRecord, cap: Capture, facts: StreamFacts, ollamon_wait_ms: float | None
) -> None:
    times = cap.content_times
    streamed = facts.framing in ("ndjson", "sse")
    if streamed and times:
        rec.ttft_ms = (times[0] - cap.arrival) * 1000.0
    if len(times) >= 2:
        # Subtract in C, sort the raw gaps, then scale: x -> x * 1000.0 never reorders two floats, so this
        # is the same list as sorting the scaled gaps, at half the cost (it runs per record, bench/writer_bench.py).
        gaps = list(map(operator.sub, times[1:], times))
        gaps.sort()
        gaps = [g * 1000.0 for g in gaps]
        rec.itl_mean_ms = sum(gaps) / len(gaps)
        rec.itl_p95_ms = exact_quantile(gaps, 0.95)  # ollamon's one quantile definition
        rec.itl_max_ms = gaps[-1]
    total, load = facts.total_duration_ns, facts.load_duration_ns
    pe, ev = facts.prompt_eval_duration_ns, facts.eval_duration_ns
    if total is not None:
        # Absent metrics mean 0 (Ollama omits zero values).
        load_v, pe_v, ev_v = load or 0, pe or 0, ev or 0
        slot_wait_ms = max(0, total - load_v - pe_v - ev_v) / _NS_PER_MS
        rec.queue_time_ms = (ollamon_wait_ms or 0.0) + slot_wait_ms
        rec.processing_time_ms = (pe_v + ev_v) / _NS_PER_MS
        count = facts.eval_count or 0
        if not streamed and count > 0 and rec.ttft_ms is None:
            # Non-streamed: no chunk to time, so derive it from Ollama's durations (docs/metrics.md).
            rec.ttft_ms = (ollamon_wait_ms or 0.0) + (total - ev_v + ev_v / count) / _NS_PER_MS
        if count > 0 and ev_v > 0:
            rec.tokens_per_second = count / (ev_v / 1e9)
    elif streamed and len(times) >= 2 and times[-1] > times[0]:
        # /v1 streams carry no durations: tokens/s over the observed generation span instead.
        rec.tokens_per_second = (len(times) - 1) / (times[-1] - times[0])


def _apply_outcome(
    rec: InferenceRecord, cap: Capture, facts: StreamFacts | None, req: RequestFacts | None
) -> None:
    stamp = iso_utc(cap.arrival_wall)

    def error(error_type: str, message: str, severity: str, stack: str | None = None) -> None:
        rec.success = False
        rec.error_message = message
        rec.error = ErrorRecord(
            timestamp=stamp,
            request_id=cap.request_id,
            error_type=error_type,
            error_message=message,
            stack_trace=stack,
            model_name=rec.model_name,
            endpoint=cap.endpoint,
            user_id=cap.user_id,
            severity=severity,
            api_key_id=cap.api_key_id,
            team=cap.team,
            upstream=cap.upstream,
        )

    if cap.cancelled:
        rec.success = False
        rec.error_message = "client disconnected"
        return
    if cap.failure is not None:
        f = cap.failure
        error(f.error_type, f.message, f.severity, f.stack_trace)
        return
    status = cap.status or 0
    if facts is None:
        return
    if not 200 <= status < 300:
        message = facts.error_message or f"HTTP {status}"
        error("upstream_status", message, "warning" if status < 500 else "error")
    elif facts.error_message is not None:
        error("stream_error", facts.error_message, "error")
    elif not facts.complete:
        error("truncated", "stream ended without a final chunk", "error")
