"""The usage feature in the app: prices on the forwarder, the usage rollup, quotas, and ``/ollamon/api/usage``.

``setup(app)`` parses ``usage.*`` (already validated by proxy/config.py), adds the route and a cleanup
context that, once the writer and the forwarder run:

* hands the prices to the forwarder, so each record is charged when it is built (``Capture.build``, on the
  writer's thread: never on the request path);
* adds storage's ``UsageHook`` to the store, so ``usage_hour`` follows every batch;
* seeds the quota book from the database, subscribes it to committed batches, registers its check on the
  gate (proxy/api/auth.py) when a quota is hard, and feeds the alert engine ``quota_used_percent`` (the
  highest share of any quota, in percent) every ``alerts.interval_s``.

``GET /ollamon/api/usage?by=key|team|model|user&window=30d`` (or ``since``/``until``; ``limit``;
``format=json|csv``) answers the report of storage/usage_reads.py with the quotas' use attached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.answers import BadParameter, json_error, json_response
from proxy.api.auth import GATE_KEY
from proxy.api.params import check_known, parse_int, parse_window
from proxy.keys import CONFIG_KEY, ENGINE_KEY, FORWARDER_KEY, HEALTH_PARTS_KEY, STORE_KEY, WRITER_KEY
from proxy.usage.cost import Pricing, parse_prices
from proxy.usage.quota import QuotaBook, parse_quotas
from proxy.usage.reports import attach_quotas, seed_book, to_csv
from storage.errors import StorageError
from storage.tasks import spawn, stop
from storage.usage_reads import BY, MAX_ROWS, UsageReads
from storage.usage_rollup import UsageHook

__all__ = ["PRICING_KEY", "QUOTA_KEY", "QUOTA_METRIC", "setup"]

logger = logging.getLogger(__name__)

PRICING_KEY = web.AppKey("usage_pricing", Pricing)
QUOTA_KEY = web.AppKey("usage_quotas", QuotaBook)
QUOTA_METRIC = "quota_used_percent"
_PARAMS = ("by", "window", "since", "until", "limit", "format")
DEFAULT_WINDOW_S = 30 * 86400.0


def _reads(app: web.Application) -> UsageReads:
    return app[STORE_KEY].reads


async def usage_report(request: web.Request) -> web.Response:
    """The usage report; 400 on a bad ``by``, window, ``limit`` or ``format``, 503 if the database fails."""
    q = request.query
    try:
        check_known(q, _PARAMS)
        by = q.get("by", "model")
        if by not in BY:
            raise BadParameter("by", f"must be one of {', '.join(BY)}, got {by[:64]!r}")
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadParameter("format", f"must be json or csv, got {fmt[:64]!r}")
        limit = parse_int("limit", q.get("limit"), 1000, 1, MAX_ROWS)
        since, until = parse_window(q, time.time(), DEFAULT_WINDOW_S)
    except BadParameter as exc:
        return json_error(400, str(exc))
    try:
        report = await asyncio.to_thread(_reads(request.app).usage, since, until, by, limit)
    except StorageError as exc:
        logger.warning("%s: database error: %s", request.rel_url, exc)
        return json_error(503, f"the database cannot answer now: {exc}")
    book = request.app.get(QUOTA_KEY)
    if book is not None:
        attach_quotas(report, book)
    if fmt == "csv":
        return web.Response(text=to_csv(report), content_type="text/csv", charset="utf-8")
    return json_response(report)


def setup(app: web.Application) -> None:
    """Parse the prices and quotas, add the route, the health part and the wiring context."""
    u = app[CONFIG_KEY].usage
    app[PRICING_KEY] = Pricing(
        parse_prices(u.prices, "usage.prices"),
        parse_prices(u.reference_prices, "usage.reference_prices"),
        u.energy_price_per_kwh,
    )
    app[QUOTA_KEY] = QuotaBook(parse_quotas(u.quotas))
    app[HEALTH_PARTS_KEY]["usage"] = lambda: _health(app)
    app.router.add_get("/ollamon/api/usage", usage_report)
    app.cleanup_ctx.append(_usage_ctx)


def _health(app: web.Application) -> dict[str, Any]:
    book = app[QUOTA_KEY]
    return {"quotas": len(book.quotas), QUOTA_METRIC: book.percent_max()}


async def _feed_engine(app: web.Application, book: QuotaBook) -> None:
    interval = app[CONFIG_KEY].alerts.interval_s
    while True:
        engine = app.get(ENGINE_KEY)
        value = book.percent_max()
        if engine is not None and value is not None:
            engine.observe_system({QUOTA_METRIC: value})
        await asyncio.sleep(interval)


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE_KEY].add_hook(UsageHook())
    forwarder = app.get(FORWARDER_KEY)
    if forwarder is not None:
        forwarder.pricing = app[PRICING_KEY]
    book = app[QUOTA_KEY]
    gate = app.get(GATE_KEY)
    if gate is not None:
        book.resolver = lambda key_id: c.name if (c := gate.ring.by_id(key_id)) is not None else None
    feeder = None
    if book.quotas:
        app[WRITER_KEY].add_listener(book)
        try:
            await asyncio.to_thread(seed_book, book, _reads(app), time.time())
        except StorageError as exc:
            logger.warning("usage: quotas start from zero; the database could not be read: %s", exc)
        if any(q.hard for q in book.quotas):
            if gate is not None:
                gate.add_check(book.check)
            else:
                logger.warning("usage: hard quotas need the auth gate, which is not running: not enforced")
        feeder = spawn(_feed_engine(app, book), name="usage-quota-metrics")
    yield
    if feeder is not None:
        await stop(feeder)
