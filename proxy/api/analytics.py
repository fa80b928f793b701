"""/ollamon/api/*: summaries, trends, recent requests, errors and database health as JSON.

``setup(app)`` wires the analytics feature into the proxy: the rollup hook on the store, the retention task,
these routes and a health section. Queries run on a worker thread, each with its own read-only SQLite
connection, so a long summary never blocks the event loop or the writer. Recent requests come from the Redis
hot view when it can answer exactly what SQLite would (see ``_from_redis``). A bad parameter is a 400
``{"error": "bad parameter 'x': why"}``; docs/analytics.md lists every route with examples.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
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
from storage.browse import (
    RequestQuery,
    db_stats,
    decode_cursor,
    errors,
    filter_rows,
    page_of,
    recent_requests,
    request_detail,
)
from storage.errors import StoreUnavailableError
from storage.queries import FIGURES, Filters, QueryError, summary, timeseries
from storage.retention import AioExecutor, Retention, RetentionPolicy
from storage.rollups import RollupHook
from storage.tasks import spawn

__all__ = ["API_PREFIX", "RETENTION_KEY", "ROLLUP_KEY", "open_readonly", "setup"]

logger = logging.getLogger(__name__)

API_PREFIX = "/ollamon/api"
RETENTION_KEY = web.AppKey("retention", Retention)
ROLLUP_KEY = web.AppKey("rollup_hook", RollupHook)
T = TypeVar("T")

_FILTERS = ("model", "endpoint", "user")


def open_readonly(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to the database file (WAL lets it read beside the writer)."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=5.0)
    conn.execute("PRAGMA query_only=ON")
    return conn


async def _query(app: web.Application, fn: Callable[[sqlite3.Connection], T]) -> T:
    path = app[STORE_KEY].path

    def run() -> T:
        conn = open_readonly(path)
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


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
        except (sqlite3.Error, StoreUnavailableError) as exc:
            logger.warning("%s: database error: %s", request.rel_url, exc)
            return json_error(503, f"the database cannot answer now: {exc}")

    return wrapped


async def get_summary(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, ("window", "since", "until", *_FILTERS, "exact", "per_model"))
    since, until = parse_window(q, time.time(), 3600.0)
    f, exact = _filters(q), _exact(q)
    per_model = parse_bool("per_model", q.get("per_model"))
    body = await _query(
        request.app, lambda c: summary(c, since, until, f, exact=exact, per_model=per_model is not False)
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
    body = await _query(request.app, lambda c: timeseries(c, since, until, bucket, metrics, f, exact=exact))
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
    except StoreUnavailableError:
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
        body = await _query(request.app, lambda c: recent_requests(c, rq))
        source = "sqlite"
    body["source"] = source
    return json_response(body)


async def get_request(request: web.Request) -> web.Response:
    check_known(request.query, ())
    rid = parse_string("request_id", request.match_info["request_id"], 128)
    assert rid is not None
    body = await _query(request.app, lambda c: request_detail(c, rid))
    if body is None:
        return json_error(404, f"no request with id {rid!r}")
    return json_response(body)


async def get_errors(request: web.Request) -> web.Response:
    q = request.query
    check_known(q, ("window", "since", "until", "model", "limit"))
    since, until = parse_window(q, time.time(), 86400.0)
    model = parse_string("model", q.get("model"))
    limit = parse_int("limit", q.get("limit"), 50, 1, 1000)
    return json_response(await _query(request.app, lambda c: errors(c, since, until, model, limit)))


async def get_stats(request: web.Request) -> web.Response:
    check_known(request.query, ())
    app = request.app
    body = await _query(app, lambda c: db_stats(c, app[STORE_KEY].path))
    w = app[WRITER_KEY].stats()
    body["writer"] = {
        k: w[k] for k in ("queue_depth", "queue_size", "dropped", "written", "lost", "last_batch_ms")
    }
    retention = app.get(RETENTION_KEY)
    if retention is not None and retention.last_run is not None:
        body["last_retention_run"] = retention.last_run
    view = app.get(REDIS_KEY)
    body["redis"] = view.stats() if view is not None else None
    return json_response(body)


async def _analytics_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE_KEY]
    hook = RollupHook()
    store.add_hook(hook)
    app[ROLLUP_KEY] = hook
    r = app[CONFIG_KEY].retention
    task = None
    if r.enabled:
        retention = Retention(
            RetentionPolicy(r.raw_days, r.system_days, r.rollup_days, r.batch_rows),
            AioExecutor(store._writer_conn()),
            store.path,
        )
        app[RETENTION_KEY] = retention
        await retention.ensure_incremental_vacuum()  # a new (small) file converts at once
        task = spawn(retention.loop(r.interval_s, r.checkpoint_interval_s), name="analytics-retention")
    yield
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def _health(app: web.Application) -> Callable[[], Any]:
    def part() -> Any:
        retention = app.get(RETENTION_KEY)
        hook = app.get(ROLLUP_KEY)
        return {
            "rollup_batches": hook.batches if hook is not None else None,
            "last_retention_run": retention.last_run if retention is not None else None,
        }

    return part


def setup(app: web.Application) -> None:
    """Add the analytics feature: rollups, retention, /ollamon/api/{requests,summary,...} and health."""
    app.cleanup_ctx.append(_analytics_ctx)
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
