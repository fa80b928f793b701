"""The OpenTelemetry SDK side of the OTLP export: a tracer provider, a batch span processor and the OTLP/HTTP
exporter, with counters for what was exported, failed and dropped.

Imported only when the export is on (the SDK is the optional extra ``ollamon[otel]``). Every call here
runs off the event loop: ``emit`` on a worker thread, the exporter on the processor's own thread.

Drops are counted here rather than left to the SDK: ollamon is the processor's only producer, so it knows
how many ended spans the exporter has not yet been handed; at ``max_queue`` it drops (and counts) instead
of ending another span, and the processor's own queue (of the same size) never overflows silently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import OTEL_BSP_MAX_EXPORT_BATCH_SIZE
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy import __version__
from proxy.exports.otel_spans import SpanData

__all__ = ["CountingExporter", "SpanPipeline", "make_resource"]

logger = logging.getLogger(__name__)

_DEFAULT_BATCH = 512  # the SDK's default OTEL_BSP_MAX_EXPORT_BATCH_SIZE


def make_resource(service_name: str) -> Resource:
    """``service.name``: ``service_name`` when given, else ``OTEL_SERVICE_NAME`` /
    ``OTEL_RESOURCE_ATTRIBUTES`` (the SDK reads both), else ``ollamon``."""
    resource = Resource.create({SERVICE_VERSION: __version__})
    if service_name:
        return resource.merge(Resource({SERVICE_NAME: service_name}))
    current = str(resource.attributes.get(SERVICE_NAME, ""))
    if not current or current.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "ollamon"}))
    return resource


class CountingExporter(SpanExporter):
    """Wraps the OTLP exporter and counts spans by outcome (read from the event loop, written here)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.handed = 0  # spans the processor handed over (exported + failed + in the export call)
        self.exported = 0
        self.failed = 0
        self.failed_batches = 0
        self.last_failure: float | None = None  # Unix time
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        n = len(spans)
        self.handed += n
        try:
            result = self.inner.export(spans)
        except Exception:
            logger.exception("the OTLP exporter raised; %d spans lost", n)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += n
        else:
            self.failed += n
            self.failed_batches += 1
            self.last_failure = time.time()
        return result

    def shutdown(self) -> None:
        if not self._shut:  # the processor calls it again after ollamon did; the SDK would warn
            self._shut = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class SpanPipeline:
    """TracerProvider -> BatchSpanProcessor (bounded) -> CountingExporter -> OTLP/HTTP."""

    def __init__(
        self,
        *,
        endpoint: str | None,
        service_name: str,
        max_queue: int,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.max_queue = max_queue
        # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT/HEADERS/TIMEOUT/COMPRESSION itself.
        self.exporter = CountingExporter(exporter or OTLPSpanExporter(endpoint=endpoint))
        batch = int(os.environ.get(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) or _DEFAULT_BATCH)
        # Schedule delay and export timeout come from OTEL_BSP_* (the processor reads them when not given).
        self.processor = BatchSpanProcessor(
            self.exporter, max_queue_size=max_queue, max_export_batch_size=min(batch, max_queue)
        )
        # The sampler is the SDK's (OTEL_TRACES_SAMPLER; default: parent-based, always on).
        self.provider = TracerProvider(resource=make_resource(service_name), shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("ollamon", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # The SDK logs a warning for each malformed tracestate member: any caller could flood the log.
        logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)
        self.ended = 0  # spans handed to the processor
        self.dropped = 0  # spans not created because the queue was full
        self.not_sampled = 0  # the caller's trace was not sampled (traceparent flags 00): nothing to export
        self._lock = threading.Lock()  # emit runs on worker threads; keep the counters exact

    @property
    def queued(self) -> int:
        """Spans ended but not yet handed to the exporter."""
        return max(0, self.ended - self.exporter.handed)

    def emit(self, spans: Sequence[SpanData]) -> None:
        """Create and end one span per item (a worker thread; never raises)."""
        with self._lock:
            for data in spans:
                if self.queued >= self.max_queue:
                    self.dropped += 1
                    continue
                try:
                    self._one(data)
                except Exception:
                    self.dropped += 1
                    logger.exception("could not build the span %r; dropped", data.name)

    def _one(self, data: SpanData) -> None:
        context = self.propagator.extract(data.trace_headers) if data.trace_headers else Context()
        span = self.tracer.start_span(
            data.name,
            context=context,
            kind=SpanKind.CLIENT,
            attributes=data.attributes,
            start_time=data.start_ns,
        )
        if not span.is_recording():
            self.not_sampled += 1
            span.end(end_time=data.end_ns)
            return
        for name, at, attributes in data.events:
            span.add_event(name, attributes, timestamp=at)
        if data.error is not None:
            span.set_status(StatusCode.ERROR, data.error)
        span.end(end_time=data.end_ns)
        self.ended += 1

    def shutdown(self, timeout_s: float) -> None:
        """Export what is queued, for at most about ``timeout_s``, then stop (blocking: call it on a thread).

        The processor's own shutdown waits up to 30 s for its worker; a flush on a helper thread bounded by
        ``timeout_s``, then the exporter's shutdown (which cuts its retry waits short) keep it brief."""
        flusher = threading.Thread(target=self.processor.force_flush, name="ollamon-otel-flush", daemon=True)
        flusher.start()
        flusher.join(timeout_s)
        self.exporter.shutdown()
        self.processor.shutdown()  # type: ignore[no-untyped-call]
