"""Content analysis in the app: ``setup(app)`` wires the analyzer and serves ``/ollamon/api/content``.

With ``content.enabled`` the Forwarder gets a ``ContentTap`` (the record builder hands the text to the
analyzer, and redacts stored text when ``content.redact``), the store learns the ``ContentRecord`` rows,
and the analyzer subscribes to the writer's committed batches in a cleanup context after the writer's,
stopped before the writer drains. Every ``alerts.interval_s`` it feeds the alert engine the gauges
``unsafe_rate`` and ``pii_rate`` over the analyses of the last five minutes (proxy/content/rates.py).
docs/content.md describes it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.answers import BadParameter, json_error, json_response
from proxy.api.params import parse_window
from proxy.content.analyzer import ContentAnalyzer
from proxy.content.guard import GuardClient
from proxy.content.tap import ContentTap
from proxy.keys import (
    CONFIG_KEY,
    ENGINE_KEY,
    FORWARDER_KEY,
    HEALTH_PARTS_KEY,
    SESSION_KEY,
    STORE_KEY,
    WRITER_KEY,
)
from storage.content import register_content
from storage.content_reads import GROUPS
from storage.errors import StoreReadError
from storage.tasks import spawn

__all__ = ["ANALYZER_KEY", "content_api", "setup"]

ANALYZER_KEY = web.AppKey("content_analyzer", ContentAnalyzer)
DEFAULT_WINDOW_S = 3600.0


def setup(app: web.Application) -> None:
    """Add the route and the health part; with ``content.enabled`` also the analyzer."""
    app.router.add_get("/ollamon/api/content", content_api)
    app[HEALTH_PARTS_KEY]["content"] = lambda: _health(app)
    if app[CONFIG_KEY].content.enabled:
        app.cleanup_ctx.append(_analyzer_ctx)


def _health(app: web.Application) -> dict[str, Any]:
    analyzer = app.get(ANALYZER_KEY)
    return {"enabled": False} if analyzer is None else analyzer.stats()


async def _analyzer_ctx(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG_KEY].content
    writer = app[WRITER_KEY]
    register_content(app[STORE_KEY])
    guard = None
    if c.guard_model:
        upstream = app[CONFIG_KEY].server.upstream_value
        guard = GuardClient(
            app[SESSION_KEY],
            str(upstream.url_for("/api/chat", "")),
            c.guard_model,
            c.timeout_s,
            headers={"Host": upstream.host_header},
        )
    analyzer = ContentAnalyzer(
        writer.submit,
        guard=guard,
        sample_rate=c.sample_rate,
        queue_size=c.queue_size,
        timeout_s=c.timeout_s,
        with_pii=c.pii,
        with_language=c.language,
        max_text_chars=c.max_text_chars,
    )
    analyzer.start()
    writer.add_listener(analyzer)
    forwarder = app[FORWARDER_KEY]
    forwarder.content = ContentTap(redact=c.redact)
    app[ANALYZER_KEY] = analyzer
    feeder = spawn(_feed_engine(app, analyzer), name="content-alert-metrics")
    yield
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder
    forwarder.content = None
    await analyzer.stop()


async def _feed_engine(app: web.Application, analyzer: ContentAnalyzer) -> None:
    """Give the alert engine the five-minute rates every ``alerts.interval_s`` (a rate without data is left
    out, so a rule on it has no data rather than 0)."""
    interval = app[CONFIG_KEY].alerts.interval_s
    while True:
        engine = app.get(ENGINE_KEY)
        rates = analyzer.rates.rates()
        if engine is not None and rates:
            engine.observe_system(rates)
        await asyncio.sleep(interval)


async def content_api(request: web.Request) -> web.Response:
    """``?window=`` (or ``since``/``until``; default 1h), ``?by=model|key|user``: rates from the table."""
    query = request.query
    by = query.get("by")
    try:
        since, until = parse_window(query, time.time(), DEFAULT_WINDOW_S)
        if by is not None and by not in GROUPS:
            raise BadParameter("by", f"must be one of {', '.join(GROUPS)}")
    except BadParameter as exc:
        return json_error(400, str(exc))
    reads = request.app[STORE_KEY].reads
    try:
        body = await asyncio.to_thread(reads.content_summary, since, until, by)
    except StoreReadError as exc:
        return json_error(503, f"the database cannot answer now: {exc}")
    body["enabled"] = request.app[CONFIG_KEY].content.enabled
    return json_response(body)
