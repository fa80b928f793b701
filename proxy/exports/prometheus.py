"""``GET /ollamon/metrics``: ollamon's numbers in the Prometheus text format, or OpenMetrics when asked.

Per app, nothing global (two apps in one process never share series). Two sources:

- ``prom_records.RecordMetrics``: histograms and counters observed from every batch the writer commits
  (a writer listener on the event loop, off the request path), rendered by ``prom_text``, which caches
  each label set's lines (prometheus_client's exposition is far too slow for ~100 models of histograms);
- ``prom_state.StateCollector``: gauges read at scrape time from memory (live requests per model, the
  writer, Redis/upstream/database up, alert rules, the sampler's latest reading), written by
  ``prom_text.ScrapeFamily`` the same fast way.

``prometheus_client.exposition.choose_encoder`` picks the format from ``Accept`` (the text format, or
OpenMetrics 1.0 when asked, as Prometheus does by default); both parts follow it. Tests read the output
with prometheus_client's own parsers and ``promtool check metrics``.

A scrape never touches SQLite. The admin token guards ``/ollamon/metrics`` on the main listener
(proxy/access.py). With ``metrics.listen`` set, ``/metrics`` and ``/ollamon/metrics`` are also served
alone on that address (for a scraper that should see nothing else), behind the same token when one is set.
docs/exports.md lists every series.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.exposition import choose_encoder

from proxy.access import ADMIN_KEY
from proxy.answers import json_error
from proxy.exports.prom_records import ModelCap, RecordMetrics
from proxy.exports.prom_state import StateCollector
from proxy.guard import is_loopback_listen
from proxy.keys import CONFIG_KEY, PROBE_KEY, WRITER_KEY

__all__ = ["METRICS_RUNNER_KEY", "PROMETHEUS_KEY", "Exporter", "setup"]

logger = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exporter:
    """One app's registry: the record-fed series, the scrape-time collector, and the rendering."""

    def __init__(self, app: web.Application, max_models: int) -> None:
        self.models = ModelCap(max_models)
        self.records = RecordMetrics(self.models)
        self.state = StateCollector(app, self.models)
        self.scrapes = 0

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        try:
            _, content_type = choose_encoder(accept)
        except Exception:  # a malformed version= parameter: answer in the plain text format
            content_type = TEXT_CONTENT_TYPE
        self.scrapes += 1
        openmetrics = content_type.startswith("application/openmetrics-text")
        parts = self.records.render(openmetrics)
        parts.append(self.state.render(openmetrics))
        if openmetrics:
            parts.append(b"# EOF\n")
        return b"".join(parts), content_type


PROMETHEUS_KEY = web.AppKey("prometheus_exporter", Exporter)
METRICS_RUNNER_KEY = web.AppKey("metrics_runner", web.AppRunner)


def setup(app: web.Application) -> None:
    """Add the route and the exporter's context when ``metrics.enabled`` (else /ollamon/metrics is 404)."""
    config = app[CONFIG_KEY].metrics
    if not config.enabled:
        return
    app[PROMETHEUS_KEY] = Exporter(app, config.max_models)
    app.router.add_get("/ollamon/metrics", _metrics_for(app))
    app.cleanup_ctx.append(_exporter_ctx)


def _metrics_for(app: web.Application) -> Handler:
    """The handler, bound to the proxy app (the separate listener's requests belong to another app)."""
    exporter = app[PROMETHEUS_KEY]

    async def metrics(request: web.Request) -> web.StreamResponse:
        probe = app.get(PROBE_KEY)
        if probe is not None:
            # Shared with health and the alert engine. A scrape never waits on Ollama: it reads the last
            # verdict (at most ~2 s old; the first scrape asks once) and a stale one is refreshed behind it.
            verdict = probe.cached()
            if verdict is None:
                verdict = await probe.check()
            exporter.state.upstream = bool(verdict.get("reachable"))
        body, content_type = exporter.render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return metrics


async def _exporter_ctx(app: web.Application) -> AsyncIterator[None]:
    """Subscribe to committed batches; start the separate listener when ``metrics.listen`` is set."""
    exporter = app[PROMETHEUS_KEY]
    app[WRITER_KEY].add_listener(exporter.records)
    listen = app[CONFIG_KEY].metrics.listen
    runner: web.AppRunner | None = None
    if listen:
        runner = await _start_listener(app, listen)
        app[METRICS_RUNNER_KEY] = runner
    try:
        yield
    finally:
        if runner is not None:
            await runner.cleanup()


async def _start_listener(app: web.Application, listen: str) -> web.AppRunner:
    """``/metrics`` and ``/ollamon/metrics`` alone on ``listen`` (HOST:PORT, validated by the config)."""
    host, _, port = listen.strip().rpartition(":")
    handler = _metrics_for(app)
    access = app.get(ADMIN_KEY)

    async def guarded(request: web.Request) -> web.StreamResponse:
        if access is not None and not access.allows(request):
            resp = json_error(401, "ollamon: this endpoint needs the admin token (Authorization: Bearer ...)")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="ollamon"'
            return resp
        return await handler(request)

    async def not_found(request: web.Request) -> web.Response:
        return json_error(404, f"ollamon: only /metrics is served here, not {request.rel_url.path}")

    side = web.Application()
    side.router.add_get("/metrics", guarded)
    side.router.add_get("/ollamon/metrics", guarded)
    side.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(side, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    except BaseException:
        await runner.cleanup()
        raise
    logger.info("metrics also served alone on %s", listen)
    if access is None and not is_loopback_listen(host):
        logger.warning(
            "metrics.listen %s is beyond loopback without admin.token: anyone who reaches it reads the metrics "
            "(model names included)",
            listen,
        )
    return runner
