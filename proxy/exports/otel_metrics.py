"""The GenAI histograms over OTLP/HTTP: the same instruments, boundaries and rules as the Prometheus export.

``gen_ai.client.operation.duration`` (s), ``gen_ai.client.token.usage`` ({token}, by ``gen_ai.token.type``),
``gen_ai.server.time_to_first_token`` (s) and ``gen_ai.server.time_per_output_token`` (s), observed from
committed records on the export's worker thread, with the conventions' advised bucket boundaries (taken
from ``prom_records``, so both exports bucket alike). A ``PeriodicExportingMetricReader`` sends them every
``OTEL_METRIC_EXPORT_INTERVAL`` ms (SDK default 60 000); ``OTEL_METRICS_EXPORTER=none`` turns this off.

Attributes are bounded like the Prometheus labels: operation names from a fixed table, ``error.type`` from
a fixed set, and at most ``metrics.max_models`` distinct models (later ones are ``other``).
Imported only when the export is on (it needs the SDK).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from proxy import __version__
from proxy.exports.prom_records import (
    DURATION_BUCKETS,
    OPERATION_NAMES,
    OTHER,
    PROVIDER,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    ModelCap,
    error_type,
)
from storage.records import InferenceRecord

__all__ = ["CountingMetricExporter", "MetricPipeline"]

logger = logging.getLogger(__name__)

_NOT_INFERENCE = frozenset({"load", "unload"})  # load/unload calls are not inferences (docs/metrics.md)


class CountingMetricExporter(OTLPMetricExporter):
    """The OTLP metric exporter, counting export calls by outcome (for /ollamon/health)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint=endpoint)  # headers, timeout, temporality: OTEL_EXPORTER_OTLP_* variables
        self.exported = 0
        self.failed = 0
        self.last_failure: float | None = None  # Unix time

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = super().export(metrics_data, timeout_millis, **kwargs)
        except Exception:
            logger.exception("the OTLP metric exporter raised")
            result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self.exported += 1
        else:
            self.failed += 1
            self.last_failure = time.time()
        return result


class MetricPipeline:
    """A MeterProvider with one periodic OTLP reader and the four GenAI histograms."""

    def __init__(
        self,
        *,
        endpoint: str,
        resource: Resource,
        max_models: int,
        server_address: str,
        server_port: int,
    ) -> None:
        self.exporter = CountingMetricExporter(endpoint=endpoint)
        # Interval and timeout come from OTEL_METRIC_EXPORT_INTERVAL / _TIMEOUT (read by the reader).
        self.reader = PeriodicExportingMetricReader(self.exporter)
        self.provider = MeterProvider(resource=resource, metric_readers=[self.reader], shutdown_on_exit=False)
        meter = self.provider.get_meter("ollamon", __version__)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration: arrival at ollamon to the last byte sent.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per request.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to the first content chunk (ttft_ms), successful requests.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="(response_time - ttft) / (output tokens - 1), successful requests.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
        self.models = ModelCap(max_models)
        self.server = {"server.address": server_address, "server.port": server_port}
        self.observed = 0

    def observe(self, records: Sequence[InferenceRecord]) -> None:
        """Record each inference (the export's worker thread; one thread at a time)."""
        for r in records:
            if r.done_reason in _NOT_INFERENCE:
                continue
            self.observed += 1
            operation = OPERATION_NAMES.get(r.endpoint, OTHER)
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": self.models.label(r.model_name),
                **self.server,
            }
            err = error_type(r)
            if r.response_time_ms is not None:
                self.duration.record(
                    r.response_time_ms / 1000.0, {**attrs, "error.type": err} if err else attrs
                )
            if r.prompt_tokens is not None:
                self.tokens.record(r.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
            if r.completion_tokens is not None and operation != "embeddings":
                self.tokens.record(r.completion_tokens, {**attrs, "gen_ai.token.type": "output"})
            if not r.success or r.ttft_ms is None:
                continue
            self.ttft.record(r.ttft_ms / 1000.0, attrs)
            n = r.completion_tokens
            if n is not None and n >= 2 and r.response_time_ms is not None:
                self.tpot.record(max(0.0, r.response_time_ms - r.ttft_ms) / (n - 1) / 1000.0, attrs)

    def shutdown(self, timeout_s: float) -> None:
        """Export a last collection and stop (blocking: call it on a thread)."""
        self.provider.shutdown(timeout_millis=timeout_s * 1000)
