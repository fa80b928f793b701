"""``usage_hour``: hourly usage per API key, team, model and user, kept up to date in the writer's transaction.

Why a table of its own: the performance rollups (storage/rollups.py) group by model and endpoint only, and
raw rows go after ``retention.raw_days``; a month's bill must survive that, per key and team. One row holds,
for one UTC hour (``bucket``, Unix seconds) and one (``api_key_id``, ``team``, ``model_name``, ``user_id``)
group, the sums a usage report needs. A NULL dimension is stored as ``''``. Rows whose ``done_reason`` is
``load`` or ``unload`` are not inferences and are left out, as in the rollups.

Counts: ``requests`` (every inference row), ``failed`` (neither successful nor cancelled), ``rate_limited``
(``status_code`` 429: refused by a rate limit or a hard quota); sums: ``prompt_tokens``,
``completion_tokens``, ``cost_usd``, ``cloud_equiv_usd``, ``energy_j``, ``energy_cost_usd`` (a NULL adds 0)
over the other rows: a refused request was never served, so the prompt estimate its row may carry is not
usage.

``UsageHook`` is a ``SQLiteStore`` batch hook (one upsert per batch); ``backfill_usage`` builds the same rows
from existing raw rows (migration m009). Cardinality: at most one row per distinct group per hour, so never
more rows than requests; user ids are whatever callers send (docs/usage.md says so).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

from storage.records import InferenceRecord, Record
from storage.rollups import NOT_INFERENCE, parse_ts

__all__ = [
    "DIMENSIONS",
    "SUMS",
    "USAGE_COLUMNS",
    "UsageHook",
    "backfill_usage",
    "create_usage_table",
    "usage_rows",
]

DIMENSIONS: tuple[str, ...] = ("api_key_id", "team", "model_name", "user_id")
COUNTS: tuple[str, ...] = ("requests", "failed", "rate_limited", "prompt_tokens", "completion_tokens")
SUMS: tuple[str, ...] = (*COUNTS, "cost_usd", "cloud_equiv_usd", "energy_j", "energy_cost_usd")
USAGE_COLUMNS: tuple[str, ...] = ("bucket", *DIMENSIONS, *SUMS)
HOUR_S = 3600
REFUSED = 429  # a rate limit or a hard quota turned the request away


def create_usage_table(conn: sqlite3.Connection) -> None:
    """The ``usage_hour`` table and its index (migration m009)."""
    dims = "".join(f"{d} TEXT NOT NULL DEFAULT '', " for d in DIMENSIONS)
    counts = "".join(f"{c} INTEGER NOT NULL DEFAULT 0, " for c in COUNTS)
    sums = "".join(f"{c} REAL NOT NULL DEFAULT 0, " for c in SUMS if c not in COUNTS)
    conn.execute(
        f"""
        CREATE TABLE usage_hour (
            id INTEGER PRIMARY KEY,
            bucket INTEGER NOT NULL,
            {dims}{counts}{sums}
            UNIQUE (bucket, {", ".join(DIMENSIONS)})
        )
        """
    )


def _upsert_sql() -> str:
    cols = ", ".join(USAGE_COLUMNS)
    marks = ", ".join("?" * len(USAGE_COLUMNS))
    sets = ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMS)
    return (
        f"INSERT INTO usage_hour ({cols}) VALUES ({marks}) "
        f"ON CONFLICT (bucket, {', '.join(DIMENSIONS)}) DO UPDATE SET {sets}"
    )


_UPSERT = _upsert_sql()


def usage_rows(records: Sequence[Record]) -> list[tuple[Any, ...]]:
    """The ``usage_hour`` rows (``USAGE_COLUMNS`` order) adding up ``records``' inference rows."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in records:
        if not isinstance(r, InferenceRecord) or r.done_reason in NOT_INFERENCE:
            continue
        minute = parse_ts(r.timestamp)
        if minute is None:
            continue
        key = (
            minute // HOUR_S * HOUR_S,
            r.api_key_id or "",
            r.team or "",
            r.model_name or "",
            r.user_id or "",
        )
        s = groups.get(key)
        if s is None:
            s = groups[key] = [0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0]
        s[0] += 1
        if not r.success and not r.cancelled:
            s[1] += 1
        if r.status_code == REFUSED:
            s[2] += 1
            continue  # refused before Ollama saw it: no tokens, no cost (an estimate may be on the row)
        s[3] += r.prompt_tokens or 0
        s[4] += r.completion_tokens or 0
        s[5] += r.cost_usd or 0.0
        s[6] += r.cloud_equiv_usd or 0.0
        s[7] += r.energy_j or 0.0
        s[8] += r.energy_cost_usd or 0.0
    return [(*k, *v) for k, v in groups.items()]


class UsageHook:
    """``SQLiteStore.add_hook(UsageHook())``: adds every batch's inference records to ``usage_hour``."""

    def __init__(self) -> None:
        self.batches = 0

    async def __call__(self, db: aiosqlite.Connection, records: Sequence[Record]) -> None:
        rows = usage_rows(records)
        if rows:
            await db.executemany(_UPSERT, rows)
            self.batches += 1


def served_sums(present: set[str], integer: bool = False) -> list[str]:
    """SQL sums of the token, cost and energy columns over served rows (not 429), for raw rows."""
    out = []
    for c in SUMS[3:]:
        value = c if c in present else "NULL"
        total = f"TOTAL(CASE WHEN COALESCE(status_code, 0) = {REFUSED} THEN 0 ELSE {value} END)"
        out.append(f"CAST({total} AS INTEGER)" if integer and c in COUNTS else total)
    return out


def backfill_usage(conn: sqlite3.Connection) -> None:
    """Roll up every existing raw row into ``usage_hour`` (sync, inside the migration's transaction).
    Rows older than m009 were charged nothing: their cost columns are NULL and add 0."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(inference_metrics)")}

    def col(name: str) -> str:
        return name if name in present else "NULL"

    bucket = "CAST(strftime('%s', substr(timestamp, 1, 13) || ':00:00') AS INTEGER)"
    dims = ", ".join(f"COALESCE({col(d)}, '')" for d in DIMENSIONS)
    sql = f"""
        INSERT INTO usage_hour ({", ".join(USAGE_COLUMNS)})
        SELECT {bucket} AS b, {dims},
               COUNT(*),
               SUM(success = 0 AND cancelled = 0),
               SUM(COALESCE(status_code, 0) = 429),
               {", ".join(served_sums(present, integer=True))}
        FROM inference_metrics
        WHERE (done_reason IS NULL OR done_reason NOT IN ('load', 'unload')) AND {bucket} IS NOT NULL
        GROUP BY b, {dims}
    """
    conn.execute(sql)
