"""Reads of the resource tables (``system_metrics``, ``gpu_metrics``) and the CLI's raw export.

Synchronous on a ``sqlite3.Connection`` (or PostgreSQL's stand-in, storage/postgres/sync_conn.py) like
storage/queries.py; ``storage.reads.Reads`` is the way in.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from storage.queries import QueryError, columns_of
from storage.records import iso_utc

__all__ = ["export_rows", "latest_system", "system_history", "tables"]


def tables(conn: sqlite3.Connection) -> set[str]:
    """Names of the tables in the database."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def system_history(conn: sqlite3.Connection, since_iso: str) -> list[dict[str, Any]]:
    """System samples since ``since_iso`` (without ``id`` and ``extra``), each with its GPU rows."""
    rows = _dicts(
        conn.execute("SELECT * FROM system_metrics WHERE timestamp >= ? ORDER BY timestamp, id", (since_iso,))
    )
    gpus: dict[str, list[dict[str, Any]]] = {}
    cur = conn.execute(
        "SELECT * FROM gpu_metrics WHERE timestamp >= ? ORDER BY timestamp, gpu_index", (since_iso,)
    )
    for g in _dicts(cur):
        gpus.setdefault(g["timestamp"], []).append(g)
    for row in rows:
        row.pop("id", None)
        row.pop("extra", None)
        row["gpus"] = gpus.get(row["timestamp"], [])
    return rows


def latest_system(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The newest system sample and the GPU rows of the newest GPU timestamp; None without samples."""
    present = tables(conn)
    if "system_metrics" not in present:
        return None
    rows = _dicts(conn.execute("SELECT * FROM system_metrics ORDER BY id DESC LIMIT 1"))
    if not rows:
        return None
    out = rows[0]
    out["gpus"] = []
    if "gpu_metrics" in present:
        (last,) = conn.execute("SELECT MAX(timestamp) FROM gpu_metrics").fetchone()
        out["gpus"] = _dicts(
            conn.execute("SELECT * FROM gpu_metrics WHERE timestamp = ? ORDER BY gpu_index", (last,))
        )
    return out


def export_rows(conn: sqlite3.Connection, table: str, since: float, until: float) -> Iterator[Sequence[Any]]:
    """The column names, then the rows of ``table`` in [since, until) in insertion order, 1000 at a time.

    Checked against the real table names before anything runs (the name goes into the SQL text)."""
    present = columns_of(conn, table) if table in tables(conn) else set()
    if "timestamp" not in present:
        raise QueryError("table", f"{table}: no such table with a timestamp column")
    stream = getattr(conn, "stream", None)  # PostgreSQL (storage/postgres/sync_conn.py): a server-side cursor
    order = "id" if "id" in present else ("timestamp" if stream is not None else "rowid")
    sql = f"SELECT * FROM {table} WHERE timestamp >= ? AND timestamp < ? ORDER BY {order}"
    params = (iso_utc(since), iso_utc(until))
    if stream is not None:
        rows: Iterator[Sequence[Any]] = stream(sql, params)
        return rows
    cur = conn.execute(sql, params)

    def chunks() -> Iterator[Sequence[Any]]:
        yield [d[0] for d in cur.description]
        while chunk := cur.fetchmany(1000):
            yield from chunk

    return chunks()
