"""Row-level queries: recent requests (cursor pagination), one request, errors grouped, database health.

Synchronous on a ``sqlite3.Connection`` like storage/queries.py. Rows come back the way the Redis hot view
holds them (exactly the ``INFERENCE_COLUMNS`` keys, booleans and JSON decoded, no ``id``), so an answer read
from Redis and one read from SQLite are equal (``filter_rows`` is the shared filter for the Redis side).

Cursors are opaque strings naming the last row of a page by ``(timestamp, request_id)``; the next page is the
rows written before the first row with that pair. A cursor whose row was deleted by retention yields an empty
page (everything older was deleted with it).
"""

from __future__ import annotations

import base64
import binascii
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from storage.queries import Filters, QueryError, columns_of
from storage.records import INFERENCE_COLUMNS, iso_utc

__all__ = [
    "RequestQuery",
    "db_stats",
    "decode_cursor",
    "encode_cursor",
    "errors",
    "filter_rows",
    "page_of",
    "recent_requests",
    "request_detail",
    "stored",
]

_BOOL = ("success", "stream", "cancelled", "cloud")
_JSON = ("metadata", "stop")


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """What ``requests`` lists: newest first, filtered, ``limit`` at a time."""

    filters: Filters = field(default_factory=Filters)
    success: bool | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    cursor: tuple[str, str] | None = None


def encode_cursor(row: dict[str, Any]) -> str:
    raw = orjson.dumps([row["timestamp"], row["request_id"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str, str]:
    """The (timestamp, request_id) of a cursor; ``QueryError("cursor")`` when it is not one of ours."""
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise QueryError("cursor", "not a cursor returned by this API") from exc
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise QueryError("cursor", "not a cursor returned by this API")
    return value[0], value[1]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for c in _BOOL:
        if row.get(c) is not None:
            row[c] = bool(row[c])
    for c in _JSON:
        if row.get(c) is not None:
            row[c] = orjson.loads(row[c])
    return row


def _select_columns(conn: sqlite3.Connection) -> str:
    present = columns_of(conn, "inference_metrics")
    return ", ".join(c if c in present else f"NULL AS {c}" for c in INFERENCE_COLUMNS)


def _fetch(conn: sqlite3.Connection, sql: str, params: Iterable[Any]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    page = rows[:limit]
    more = len(rows) > limit
    return {"requests": page, "next_cursor": encode_cursor(page[-1]) if more and page else None}


def recent_requests(conn: sqlite3.Connection, q: RequestQuery) -> dict[str, Any]:
    """``{"requests": [...newest first], "next_cursor": str | None}`` from SQLite."""
    where: list[str] = []
    params: list[Any] = []
    f = q.filters
    for col, value in (
        ("model_name", f.model),
        ("endpoint", f.endpoint),
        ("user_id", f.user),
        ("upstream", f.upstream),
        ("instance", f.instance),
    ):
        if value is not None:
            where.append(f"{col} = ?")
            params.append(value)
    if q.success is not None:
        where.append("success = ?")
        params.append(int(q.success))
    if q.since is not None:
        where.append("timestamp >= ?")
        params.append(iso_utc(q.since))
    if q.until is not None:
        where.append("timestamp < ?")
        params.append(iso_utc(q.until))
    if q.cursor is not None:
        where.append("id < (SELECT MIN(id) FROM inference_metrics WHERE request_id = ? AND timestamp = ?)")
        params += [q.cursor[1], q.cursor[0]]
    sql = f"SELECT {_select_columns(conn)} FROM inference_metrics"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    rows = [_decode(r) for r in _fetch(conn, sql, [*params, q.limit + 1])]
    return _page(rows, q.limit)


def filter_rows(rows: Iterable[dict[str, Any]], q: RequestQuery) -> list[dict[str, Any]]:
    """Apply ``q``'s filters (not its cursor) to rows already newest first, as SQL would."""
    f = q.filters
    lo = iso_utc(q.since) if q.since is not None else None
    hi = iso_utc(q.until) if q.until is not None else None
    out = []
    for r in rows:
        if f.model is not None and r.get("model_name") != f.model:
            continue
        if f.endpoint is not None and r.get("endpoint") != f.endpoint:
            continue
        if f.user is not None and r.get("user_id") != f.user:
            continue
        if f.upstream is not None and r.get("upstream") != f.upstream:
            continue
        if f.instance is not None and r.get("instance") != f.instance:
            continue
        if q.success is not None and bool(r.get("success")) != q.success:
            continue
        ts = r.get("timestamp") or ""
        if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
            continue
        out.append({c: r.get(c) for c in INFERENCE_COLUMNS})
    return out


def page_of(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A page from rows already filtered and newest first (``limit + 1`` of them tell whether more exist)."""
    return _page(rows, limit)


def request_detail(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """The newest row with ``request_id``, its errors and its stored text; None when unknown."""
    rows = _fetch(
        conn,
        f"SELECT {_select_columns(conn)} FROM inference_metrics WHERE request_id = ? ORDER BY id DESC LIMIT 1",
        [request_id],
    )
    errs = _fetch(
        conn,
        "SELECT timestamp, error_type, error_message, stack_trace, severity FROM error_metrics "
        "WHERE request_id = ? ORDER BY id",
        [request_id],
    )
    if not rows and not errs:
        return None
    text = _fetch(
        conn, "SELECT prompt_text, response_text FROM request_text WHERE request_id = ?", [request_id]
    )
    return {
        "request": _decode(rows[0]) if rows else None,
        "errors": errs,
        "text": text[0] if text else None,
    }


def errors(
    conn: sqlite3.Connection, since: float, until: float, model: str | None = None, limit: int = 50
) -> dict[str, Any]:
    """Errors in [since, until): counts grouped by (error_type, model_name), and the ``limit`` newest."""
    where = "timestamp >= ? AND timestamp < ?"
    params: list[Any] = [iso_utc(since), iso_utc(until)]
    if model is not None:
        where += " AND model_name = ?"
        params.append(model)
    groups = _fetch(
        conn,
        f"SELECT error_type, model_name, COUNT(*) AS count, MIN(timestamp) AS first_seen, "
        f"MAX(timestamp) AS last_seen, MAX(id) AS last_id FROM error_metrics WHERE {where} "
        f"GROUP BY error_type, model_name ORDER BY count DESC, error_type, model_name NULLS FIRST",
        params,
    )
    for g in groups:
        last = conn.execute("SELECT error_message FROM error_metrics WHERE id = ?", (g.pop("last_id"),))
        g["last_message"] = last.fetchone()[0]
    recent = _fetch(
        conn,
        "SELECT timestamp, request_id, error_type, error_message, model_name, endpoint, user_id, severity "
        f"FROM error_metrics WHERE {where} ORDER BY id DESC LIMIT ?",
        [*params, limit],
    )
    return {
        "since": iso_utc(since),
        "until": iso_utc(until),
        "total": sum(g["count"] for g in groups),
        "groups": groups,
        "recent": recent,
    }


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def stored(conn: sqlite3.Connection) -> dict[str, Any]:
    """What both backends' ``db_stats`` report: rows per table, oldest/newest record, last retention run."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    tables = {n: conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0] for n in names}
    span: dict[str, dict[str, str | None]] = {}
    for table in ("inference_metrics", "error_metrics", "system_metrics", "gpu_metrics"):
        if "timestamp" in columns_of(conn, table):
            lo, hi = conn.execute(f"SELECT MIN(timestamp), MAX(timestamp) FROM {table}").fetchone()
            span[table] = {"oldest": lo, "newest": hi}
    last_run = None
    if "retention_runs" in tables:
        runs = _fetch(conn, "SELECT * FROM retention_runs ORDER BY id DESC LIMIT 1", [])
        if runs:
            last_run = runs[0]
            last_run["deleted"] = orjson.loads(last_run["deleted"])
            last_run["dry_run"] = bool(last_run["dry_run"])
    return {"tables": tables, "records": span, "last_retention_run": last_run}


def db_stats(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """Rows per table, file and WAL size, oldest/newest record, pages, last retention run (SQLite; PostgreSQL's
    is storage/postgres/db_stats.py)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return {
        "path": str(path),
        "file_bytes": _size(path),
        "wal_bytes": _size(Path(f"{path}-wal")) or 0,
        "page_size": page_size,
        "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
        "freelist_pages": conn.execute("PRAGMA freelist_count").fetchone()[0],
        "auto_vacuum": {0: "none", 1: "full", 2: "incremental"}.get(
            conn.execute("PRAGMA auto_vacuum").fetchone()[0], "unknown"
        ),
        **stored(conn),
    }
