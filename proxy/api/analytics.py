"""/ollamon/api/*: summaries, trends, recent requests, errors and database health as JSON.

``setup(app)`` adds these routes and a health section. Storage does the rest: the store registers its rollup
hook when it opens and the writer runs retention (proxy/app.py passes the policy); this module only reads
their figures. Queries go through ``storage.reads.Reads`` on a worker thread (each on a read-only
connection of its own), so a long summary never blocks the event loop or the writer. Recent requests come from the Redis
hot view when it can answer exactly what SQLite would (see ``_from_redis``). A bad parameter is a 400
``{"error": "bad parameter 'x': why"}``; docs/analytics.md lists every route with examples.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from proxy.answers import BadParameter, json_error, json_response
from proxy.api.params import (
    check_known,
    parse_bool,
    parse_int,
    parse_string,
    parse_time,
    parse_window,
)
from proxy.keys import CONFIG_KEY, HEALTH_PARTS_KEY, REDIS_KEY, STORE_KEY, WRITER_KEY
from storage.browse import RequestQuery, decode_cursor, filter_rows, page_of
from storage.errors import StorageError
from storage.queries import FIGURES, Filters, QueryError
from storage.reads import Reads

__all__ = ["API_PREFIX", "setup"]

logger = logging.getLogger(__name__)

API_PREFIX = "/ollamon/api"
T = TypeVar("T")

_FILTERS = ("model", "endpoint", "user", "upstream", "instance")


async def _query(app: web.Application, fn: Callable[[Reads], T]) -> T:
    """``fn(reads)`` on a worker thread: storage's read functions block."""
    reads = app[STORE_KEY].reads
    return await asyncio.to_thread(fn, reads)


def _filters(q: Any) -> Filters:
    return Filters(*(parse_string(n, q.get(n)) for n in _FILTERS))


def _exact(q: Any) -> bool | None:
    text = q.get("exact")
    if text is None or text == "auto":
        return None
    value = parse_bool("exact", text)
    return value


def _handler(fn: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
    """Turn BadParameter/QueryError into 400 and database trouble into 503, never a 500 with a trace."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            result: web.StreamResponse = await fn(request)
            return result
        except BadParameter as exc:
            return json_error(400, str(exc))
        except QueryError as exc:
            return json_error(400, f"bad parameter {exc.param!r}: {exc.reason}")
        except StorageError as exc:
            logger.warning("%s: database error: %s", request.rel_url, exc)
            return json_error(503, f"the database cannot answer now: {exc}")

    return wrapped


async def get_summary(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, ("window", "since", "until", *_FILTERS, "exact", "per_model", "by"))
    since, until = parse_window(q, time.time(), 3600.0)
    f, exact = _filters(q), _exact(q)
    per_model = parse_bool("per_model", q.get("per_model"))
    by = q.get("by")  # upstream | instance; queries.summary says 400 to anything else
    body = await _query(
        request.app,
        lambda r: r.summary(since, until, f, exact=exact, per_model=per_model is not False, by=by),
    )
    return json_response(body)


async def get_timeseries(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, ("metric", "bucket", "window", "since", "until", *_FILTERS, "exact"))
    since, until = parse_window(q, time.time(), 3600.0)
    metrics = [m.strip() for m in q["metric"].split(",")] if "metric" in q else list(FIGURES)
    bucket = q.get("bucket", "1m")
    f = _filters(q)
    exact = _exact(q) is True
    body = await _query(request.app, lambda r: r.timeseries(since, until, bucket, metrics, f, exact=exact))
    return json_response(body)


def _request_query(q: Any) -> RequestQuery:
    now = time.time()
    return RequestQuery(
        filters=_filters(q),
        success=parse_bool("success", q.get("success")),
        since=parse_time("since", q["since"], now) if "since" in q else None,
        until=parse_time("until", q["until"], now) if "until" in q else None,
        limit=parse_int("limit", q.get("limit"), 50, 1, 1000),
        cursor=decode_cursor(q["cursor"]) if "cursor" in q else None,
    )


async def _from_redis(app: web.Application, rq: RequestQuery) -> dict[str, Any] | None:
    """The first page from Redis, or None when Redis cannot be sure to match SQLite.

    It can when the view has every stored batch (nothing pending, failed or dropped) and its recent list
    holds more than ``limit`` matching rows: those are then exactly SQLite's newest matching rows."""
    view = app.get(REDIS_KEY)
    if view is None or rq.cursor is not None or view.status() != "ok":
        return None
    st = view.stats()
    if st["pending_batches"] or st["failed_batches"] or st["dropped_batches"]:
        return None
    try:
        rows = await view.recent(app[CONFIG_KEY].redis.recent)
    except StorageError:
        return None
    matched = filter_rows(rows, rq)
    if len(matched) <= rq.limit:
        return None
    return page_of(matched, rq.limit)


async def get_requests(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, (*_FILTERS, "success", "since", "until", "limit", "cursor"))
    rq = _request_query(q)
    body = await _from_redis(request.app, rq)
    source = "redis"
    if body is None:
        body = await _query(request.app, lambda r: r.recent_requests(rq))
        source = "postgresql" if request.app[STORE_KEY].reads.postgres else "sqlite"
    body["source"] = source
    return json_response(body)


async def get_request(request: web.Request) -> web.Response:
    check_known(request.query, ())
    rid = parse_string("request_id", request.match_info["request_id"], 128)
    assert rid is not None
    body = await _query(request.app, lambda r: r.request_detail(rid))
    if body is None:
        return json_error(404, f"no request with id {rid!r}")
    return json_response(body)


async def get_errors(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, ("window", "since", "until", "model", "limit"))
    since, until = parse_window(q, time.time(), 86400.0)
    model = parse_string("model", q.get("model"))
    limit = parse_int("limit", q.get("limit"), 50, 1, 1000)
    return json_response(await _query(request.app, lambda r: r.errors(since, until, model, limit)))


async def get_stats(request: web.Request) -> web.Response:
    check_known(request.query, ())
    app = request.app
    body = await _query(app, lambda r: r.db_stats())
    writer = app[WRITER_KEY]
    w = writer.stats()
    body["writer"] = {
        k: w[k] for k in ("queue_depth", "queue_size", "dropped", "written", "lost", "last_batch_ms")
    }
    retention = writer.maintenance
    if retention is not None and retention.last_run is not None:
        body["last_retention_run"] = retention.last_run
    view = app.get(REDIS_KEY)
    body["redis"] = view.stats() if view is not None else None
    return json_response(body)


def _health(app: web.Application) -> Callable[[], Any]:
    def part() -> Any:
        store, writer = app.get(STORE_KEY), app.get(WRITER_KEY)
        hook = store.rollups if store is not None else None
        retention = writer.maintenance if writer is not None else None
        return {
            "rollup_batches": hook.batches if hook is not None else None,
            "last_retention_run": retention.last_run if retention is not None else None,
        }

    return part


def setup(app: web.Application) -> None:
    """Add the analytics routes /ollamon/api/{requests,summary,...} and their health section."""
    app[HEALTH_PARTS_KEY]["analytics"] = _health(app)
    routes: list[tuple[str, Callable[[web.Request], Any]]] = [
        ("requests", get_requests),
        ("requests/{request_id}", get_request),
        ("summary", get_summary),
        ("timeseries", get_timeseries),
        ("errors", get_errors),
        ("stats", get_stats),
    ]
    for path, handler in routes:
        app.router.add_get(f"{API_PREFIX}/{path}", _handler(handler))
