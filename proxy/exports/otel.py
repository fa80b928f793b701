"""OpenTelemetry export: one OTLP/HTTP span per inference request, and the GenAI histograms, built from
committed records.

On when ``otel.enabled`` is true or ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set (and ``OTEL_SDK_DISABLED`` is not ``true``). The SDK is the optional extra ``ollamon[otel]``: it is
imported only then, and when it is missing ollamon logs one error naming the extra and serves without
the export.

Nothing happens on the request path but keeping the caller's ``traceparent``/``tracestate`` on the
capture. The view subscribes to the writer's committed batches (``offer`` returns at once); a background
task turns records into spans on a worker thread; the SDK's batch processor exports them from its own
thread. Every queue is bounded by ``otel.max_queue``; what does not fit is dropped and counted in the
``otel`` section of ``/ollamon/health``. The same worker records the histograms (otel_metrics.py), which
the SDK's periodic reader exports. docs/exports.md describes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.exports.otel_spans import span_data
from proxy.keys import CONFIG_KEY, HEALTH_PARTS_KEY, WRITER_KEY
from storage.records import InferenceRecord, Record, iso_utc
from storage.tasks import spawn

if TYPE_CHECKING:
    from proxy.exports.otel_export import SpanPipeline
    from proxy.exports.otel_metrics import MetricPipeline

__all__ = ["OTEL_KEY", "OtelSettings", "OtelView", "otel_settings", "setup", "signal_endpoint"]

logger = logging.getLogger(__name__)

EXTRA = "pip install 'ollamon[otel]'"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_CHUNK = 256  # records turned into spans per worker-thread call
_DRAIN_S = 2.0  # at shutdown: wait this long for the writer's last commits to reach the view
_FLUSH_S = 2.0  # then this long for the exporter to send what is queued


@dataclass(frozen=True, slots=True)
class OtelSettings:
    """The export's settings, resolved once at startup from config and the standard variables."""

    endpoint: str  # the OTLP/HTTP traces URL spans are posted to
    metrics_endpoint: str | None  # the OTLP/HTTP metrics URL; None: OTEL_METRICS_EXPORTER=none
    max_models: int  # metrics.max_models: distinct gen_ai.request.model values in the metrics
    service_name: str  # "" means OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else "ollamon"
    max_queue: int
    with_content: bool  # storage.store_text: prompt and response text go on the span
    server_address: str
    server_port: int


def signal_endpoint(config_endpoint: str, env: Mapping[str, str], signal: str = "traces") -> str:
    """``otel.endpoint`` + ``/v1/traces``; else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as is; else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``; else ``http://localhost:4318/v1/traces`` (the SDK's
    own rule, applied here so that health shows the URL really used). Likewise for ``metrics``."""
    if config_endpoint:
        return f"{config_endpoint.rstrip('/')}/v1/{signal}"
    own = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if own:
        return own
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return f"{base.rstrip('/')}/v1/{signal}"


def otel_settings(config: Config, env: Mapping[str, str]) -> OtelSettings | None:
    """The settings when the export is on, else None."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not (config.otel.enabled or any(env.get(v) for v in _ENDPOINT_VARS)):
        return None
    upstream = config.server.upstream_value
    metrics_off = env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none"
    return OtelSettings(
        endpoint=signal_endpoint(config.otel.endpoint, env, "traces"),
        metrics_endpoint=None if metrics_off else signal_endpoint(config.otel.endpoint, env, "metrics"),
        max_models=config.metrics.max_models,
        service_name=config.otel.service_name or env.get("OTEL_SERVICE_NAME", ""),
        max_queue=config.otel.max_queue,
        with_content=config.storage.store_text,
        server_address=upstream.host,
        server_port=upstream.port,
    )


def _shown(url: str) -> str:
    """The endpoint without credentials or query, for health and logs."""
    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "(unparsable)"


def _iso(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else iso_utc(epoch_s)


class OtelView:
    """The writer's listener: queues committed inference records and turns them into spans off the loop."""

    def __init__(
        self, pipeline: SpanPipeline, settings: OtelSettings, metrics: MetricPipeline | None = None
    ) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.settings = settings
        self._pending: deque[InferenceRecord] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued and nothing on the worker thread
        self._idle.set()
        self._busy = 0  # records handed to the worker thread, not yet spans
        self.dropped = 0  # records that found the queue full
        self.build_errors = 0
        self.metric_errors = 0
        self.closed = False

    def offer(self, records: Sequence[Record]) -> None:
        """Called on the event loop with each committed batch: queue, never wait, never raise."""
        if self.closed:
            return
        try:
            room = self.settings.max_queue - len(self._pending)
            for rec in records:
                if isinstance(rec, InferenceRecord):
                    if room > 0:
                        self._pending.append(rec)
                        room -= 1
                    else:
                        self.dropped += 1
            if self._pending:
                self._idle.clear()
                self._wake.set()
        except Exception:
            logger.exception("the OTLP export could not queue a batch; ignored")

    async def run(self) -> None:
        """The background task: hand queued records to a worker thread in chunks."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                n = min(_CHUNK, len(self._pending))
                chunk = [self._pending.popleft() for _ in range(n)]
                self._busy = n
                try:
                    await asyncio.to_thread(self._emit, chunk)
                finally:
                    self._busy = 0
            self._idle.set()

    def _emit(self, records: list[InferenceRecord]) -> None:
        s = self.settings
        spans = []
        for rec in records:
            try:
                spans.append(
                    span_data(
                        rec,
                        server_address=s.server_address,
                        server_port=s.server_port,
                        with_content=s.with_content,
                    )
                )
            except Exception:
                self.build_errors += 1
                logger.exception("could not map record %s to a span; skipped", rec.request_id)
        self.pipeline.emit(spans)
        if self.metrics is not None:
            try:
                self.metrics.observe(records)
            except Exception:
                self.metric_errors += 1
                logger.exception("could not record the OTLP metrics of %d records; skipped", len(records))

    @property
    def waiting(self) -> int:
        return len(self._pending) + self._busy

    async def drain(self, within: float) -> None:
        """Return once every queued record is a span, or after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within)

    def stats(self) -> dict[str, Any]:
        p = self.pipeline
        ex = p.exporter
        return {
            "enabled": True,
            "exporting": not self.closed,
            "endpoint": _shown(self.settings.endpoint),
            "service_name": str(p.provider.resource.attributes.get("service.name", "")),
            "spans_exported": ex.exported,
            "spans_failed": ex.failed,
            "export_failures": ex.failed_batches,
            "spans_dropped": self.dropped + p.dropped,
            "spans_queued": self.waiting + p.queued,
            "not_sampled": p.not_sampled,
            "build_errors": self.build_errors,
            "last_failure_at": _iso(ex.last_failure),
            "metrics": self._metrics_stats(),
        }

    def _metrics_stats(self) -> dict[str, Any] | None:
        m = self.metrics
        if m is None or self.settings.metrics_endpoint is None:
            return None
        return {
            "endpoint": _shown(self.settings.metrics_endpoint),
            "exports": m.exporter.exported,
            "export_failures": m.exporter.failed,
            "last_failure_at": _iso(m.exporter.last_failure),
            "models": len(m.models),
            "models_overflowed": m.models.overflowed,
            "errors": self.metric_errors,
        }


OTEL_KEY = web.AppKey("otel_view", OtelView)
_SETTINGS_KEY = web.AppKey("otel_settings", OtelSettings)
_PROBLEM_KEY = web.AppKey("otel_problem", list[str])


def setup(app: web.Application) -> None:
    """Register the ``otel`` health part, and the export's context when it is on."""
    settings = otel_settings(app[CONFIG_KEY], os.environ)
    app[_PROBLEM_KEY] = []
    app[HEALTH_PARTS_KEY]["otel"] = lambda: _health(app)
    if settings is None:
        return
    app[_SETTINGS_KEY] = settings
    app.cleanup_ctx.append(_otel_ctx)


def _health(app: web.Application) -> dict[str, Any]:
    view = app.get(OTEL_KEY)
    if view is not None:
        return view.stats()
    if _SETTINGS_KEY not in app:
        return {"enabled": False}
    problem = app[_PROBLEM_KEY]
    return {"enabled": True, "exporting": False, "error": problem[0] if problem else "not started"}


async def _nothing(db: object) -> None:
    """A write job that does nothing: awaiting it waits for every record queued before it to commit."""


async def _in_daemon_thread(fn: Callable[[], None], within: float) -> None:
    """Run ``fn`` on a daemon thread and wait at most ``within`` seconds (a stuck export cannot hold up
    shutdown, nor the interpreter's exit as an executor thread would)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def target() -> None:
        try:
            fn()
        except Exception:
            logger.exception("the OTLP export did not shut down cleanly")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                loop.call_soon_threadsafe(finished)

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    threading.Thread(target=target, name="ollamon-otel-shutdown", daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, within)


async def _otel_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[_SETTINGS_KEY]
    try:
        from proxy.exports.otel_export import SpanPipeline
        from proxy.exports.otel_metrics import MetricPipeline
    except ImportError as exc:
        msg = f"the OpenTelemetry SDK is not installed ({exc}); install the extra: {EXTRA}"
        logger.error("otel export is on but %s; running without it", msg)
        app[_PROBLEM_KEY].append(msg)
        yield
        return
    try:
        pipeline = SpanPipeline(
            endpoint=settings.endpoint, service_name=settings.service_name, max_queue=settings.max_queue
        )
    except Exception as exc:  # e.g. a malformed OTEL_BSP_* or OTEL_EXPORTER_OTLP_* variable
        logger.exception("the OTLP export could not start; running without it")
        app[_PROBLEM_KEY].append(f"could not start: {type(exc).__name__}: {exc}")
        yield
        return
    metrics = None
    if settings.metrics_endpoint is not None:
        try:
            metrics = MetricPipeline(
                endpoint=settings.metrics_endpoint,
                resource=pipeline.provider.resource,
                max_models=settings.max_models,
                server_address=settings.server_address,
                server_port=settings.server_port,
            )
        except Exception:
            logger.exception("the OTLP metrics export could not start; spans only")
    view = OtelView(pipeline, settings, metrics)
    task = spawn(view.run(), name="otel-export")
    writer = app[WRITER_KEY]
    writer.add_listener(view)
    app[OTEL_KEY] = view
    logger.info("exporting one span per inference request to %s (OTLP/HTTP)", _shown(settings.endpoint))
    yield
    # Requests have ended; let the writer commit what they queued so their spans go out too.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.execute_write(_nothing, transaction=False), _DRAIN_S)
    await view.drain(_DRAIN_S)
    view.closed = True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    def stop_all() -> None:
        pipeline.shutdown(_FLUSH_S)
        if metrics is not None:
            metrics.shutdown(_FLUSH_S)  # one last collection goes out

    await _in_daemon_thread(stop_all, within=2 * _FLUSH_S + 3.0)
