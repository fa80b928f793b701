"""The Prometheus series fed by committed records: the GenAI histograms and ollamon's request counters.

``RecordMetrics.offer(records)`` is a writer listener: it runs on the event loop with every batch the store
has committed, observes each ``InferenceRecord`` into this app's histograms and counters (prom_text: they render
themselves fast), and never raises. Nothing here runs on the request path, and a scrape never reads SQLite: it serialises what
was observed here.

Label values are bounded: ``gen_ai_operation_name`` and ``endpoint`` come from the fixed set of
instrumented routes (anything else is ``other``), ``status_class`` is ``1xx``..``5xx`` (or ``none``),
``error_type`` is one of error_metrics' types or ``cancelled``, and model names pass through ``ModelCap``:
the first ``metrics.max_models`` distinct names keep their own label, later ones share ``model="other"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from proxy.exports.prom_text import CounterFamily, HistogramFamily
from storage.records import InferenceRecord, Record

__all__ = [
    "DURATION_BUCKETS",
    "LOAD_BUCKETS",
    "OPERATION_NAMES",
    "OTHER",
    "PROVIDER",
    "QUEUE_BUCKETS",
    "TOKEN_BUCKETS",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "ModelCap",
    "RecordMetrics",
    "error_type",
    "status_class",
]

logger = logging.getLogger(__name__)

# The OpenTelemetry GenAI semantic conventions' advised boundaries (docs/gen-ai/gen-ai-metrics.md).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
)  # fmt: skip
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# ollamon's own histograms: the vocabulary's stem in Prometheus's base unit (queue_time_ms -> seconds).
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 30.72)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

PROVIDER = "ollama"
OTHER = "other"
UNKNOWN_MODEL = "(unknown)"

# gen_ai.operation.name per instrumented route (the semconv's well-known values); a test keeps the keys
# equal to proxy.forward.streams.INSTRUMENTED.
OPERATION_NAMES: dict[str, str] = {
    "/api/generate": "text_completion",
    "/api/chat": "chat",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    # Speech to text has no well-known value; the conventions allow a custom one.
    "/v1/audio/transcriptions": "transcription",
}

_NOT_INFERENCE = frozenset({"load", "unload"})  # load/unload calls (docs/metrics.md: not inferences)
_ERROR_TYPES = frozenset(
    {
        "upstream_status",
        "stream_error",
        "truncated",
        "upstream_unreachable",
        "upstream_timeout",
        "upstream_closed",
        "internal",
    }
)


class ModelCap:
    """Model label values, at most ``limit`` distinct ones; every later name is ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._admitted: set[str] = set()
        self.overflowed = 0  # observations that went to "other" because the cap was reached

    def label(self, name: str | None) -> str:
        model = name or UNKNOWN_MODEL
        if model in self._admitted:
            return model
        if len(self._admitted) < self.limit:
            self._admitted.add(model)
            return model
        self.overflowed += 1
        return OTHER

    def __len__(self) -> int:
        return len(self._admitted)


def status_class(code: int | None) -> str:
    """``2xx`` for 200..299, and so on; ``none`` when no status was sent."""
    if code is None or not 100 <= code <= 599:
        return "none"
    return f"{code // 100}xx"


def error_type(r: InferenceRecord) -> str:
    """The semconv ``error.type`` of a record: "" for a success, ``cancelled``, error_metrics' type, else
    ``_OTHER`` (the semconv's fallback)."""
    if r.success:
        return ""
    if r.cancelled:
        return "cancelled"
    kind = r.error.error_type if r.error is not None else None
    return kind if kind in _ERROR_TYPES else "_OTHER"


class RecordMetrics:
    """The record-fed families; ``offer`` is the writer listener, ``render`` their exposition."""

    def __init__(self, models: ModelCap) -> None:
        self.models = models
        self.offered = 0  # inference records observed
        self.errors = 0  # records an observation failed on (logged once)
        gen_ai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.duration = HistogramFamily(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: arrival at ollamon to the last byte sent (response_time_ms).",
            [*gen_ai, "error_type"],
            DURATION_BUCKETS,
            unit="seconds",
        )
        self.tokens = HistogramFamily(
            "gen_ai_client_token_usage",
            "Input (prompt_tokens) and output (completion_tokens) tokens per request.",
            [*gen_ai, "gen_ai_token_type"],
            TOKEN_BUCKETS,
        )
        self.ttft = HistogramFamily(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to first token of successful requests (ttft_ms).",
            gen_ai,
            TTFT_BUCKETS,
            unit="seconds",
        )
        self.tpot = HistogramFamily(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, successful requests: "
            "(response_time_ms - ttft_ms) / (completion_tokens - 1).",
            gen_ai,
            TPOT_BUCKETS,
            unit="seconds",
        )
        own = ["model", "endpoint"]
        self.requests = CounterFamily(
            "ollamon_requests",
            "Inference requests recorded, by status class of the answer sent (requests).",
            [*own, "status_class"],
        )
        self.failed = CounterFamily(
            "ollamon_failed",
            "Failed inference requests, not cancelled (failed), by error_metrics error_type.",
            [*own, "error_type"],
        )
        self.cancelled = CounterFamily(
            "ollamon_cancelled",
            "Inference requests whose client went away before the answer was complete (cancelled).",
            own,
        )
        self.queue = HistogramFamily(
            "ollamon_queue_time_seconds",
            "queue_time_ms in seconds: ollamon's own wait plus Ollama's parallel-slot wait.",
            ["model"],
            QUEUE_BUCKETS,
            unit="seconds",
        )
        self.load = HistogramFamily(
            "ollamon_load_duration_seconds",
            "load_duration_ms in seconds: Ollama's scheduler wait plus model (re)load (load calls included).",
            ["model"],
            LOAD_BUCKETS,
            unit="seconds",
        )
        self.energy = CounterFamily(
            "ollamon_energy_joules", "GPU energy attributed to inference requests (energy_j).", ["model"]
        )
        self.families: tuple[CounterFamily | HistogramFamily, ...] = (
            self.duration,
            self.tokens,
            self.ttft,
            self.tpot,
            self.requests,
            self.failed,
            self.cancelled,
            self.queue,
            self.load,
            self.energy,
        )

    def render(self, openmetrics: bool) -> list[bytes]:
        """Every family's exposition as chunks to join, text format or OpenMetrics (no final ``# EOF``)."""
        return [part for f in self.families for part in f.render(openmetrics)]

    def offer(self, records: Sequence[Record]) -> None:
        """Observe a committed batch (on the event loop, never raises)."""
        for r in records:
            if not isinstance(r, InferenceRecord):
                continue
            try:
                self._observe(r)
            except Exception:
                self.errors += 1
                if self.errors == 1:
                    logger.exception("prometheus: a record could not be observed; skipped")

    def _observe(self, r: InferenceRecord) -> None:
        model = self.models.label(r.model_name)
        if r.load_duration_ms is not None:
            self.load.observe((model,), r.load_duration_ms / 1000.0)
        if r.done_reason in _NOT_INFERENCE:
            return
        self.offered += 1
        endpoint = r.endpoint if r.endpoint in OPERATION_NAMES else OTHER
        operation = OPERATION_NAMES.get(r.endpoint, OTHER)
        err = error_type(r)
        self.requests.inc((model, endpoint, status_class(r.status_code)))
        if r.cancelled:
            self.cancelled.inc((model, endpoint))
        elif not r.success:
            self.failed.inc((model, endpoint, err))
        if r.response_time_ms is not None:
            self.duration.observe((operation, PROVIDER, model, err), r.response_time_ms / 1000.0)
        if r.prompt_tokens is not None:
            self.tokens.observe((operation, PROVIDER, model, "input"), r.prompt_tokens)
        if r.completion_tokens is not None and operation != "embeddings":
            self.tokens.observe((operation, PROVIDER, model, "output"), r.completion_tokens)
        if r.queue_time_ms is not None:
            self.queue.observe((model,), r.queue_time_ms / 1000.0)
        if r.energy_j is not None:
            self.energy.inc((model,), max(0.0, r.energy_j))
        if not r.success or r.ttft_ms is None:
            return
        self.ttft.observe((operation, PROVIDER, model), r.ttft_ms / 1000.0)
        n = r.completion_tokens
        if n is not None and n >= 2 and r.response_time_ms is not None:
            per_token_ms = max(0.0, r.response_time_ms - r.ttft_ms) / (n - 1)
            self.tpot.observe((operation, PROVIDER, model), per_token_ms / 1000.0)
