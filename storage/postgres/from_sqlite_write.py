"""The writing half of ``ollamon db migrate`` (storage/postgres/from_sqlite.py): one chunk of SQLite rows into
PostgreSQL, in one transaction with its progress row.

Why apart: from_sqlite.py decides what is copied and in which order (the plan, the SQLite reads, resuming);
this module knows how each kind of table is written: ``COPY`` for append-only rows (partitions first), upserts
for keyed rows, PgRollupHook's merge for rollups, an id map for alerts and their transitions. A chunk goes
in as read; when a value does not fit its column it is redone once with every value converted as the store
converts records (storage/postgres/rows.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.errors import StorageError
from storage.postgres import partitions

# The batch path's own helpers and locks, so a migrated chunk merges exactly as a live batch does.
from storage.postgres.rollups import (
    ROLLUP_LOCK,
    _columns,
    _merged,
    _typed,
    rollup_upsert_sql,
    usage_upsert_sql,
)
from storage.postgres.rows import _BY_TYPE, JSON_COLUMNS, Convert
from storage.postgres.schema import PARTITIONED
from storage.postgres.store import _PARTITION_LOCK
from storage.records import iso_utc
from storage.rollups import ROLLUP_COLUMNS
from storage.usage_rollup import USAGE_COLUMNS

__all__ = ["PROGRESS_DDL", "Copier", "Kind", "MigrateError", "Table", "pg_columns", "plan_table"]

Kind = Literal["append", "text", "keyed", "alerts", "transitions", "rollup", "usage", "content"]

_PG_TYPES = {"bigint": "BIGINT", "text": "TEXT", "smallint": "SMALLINT", "double precision": "DOUBLE PRECISION",
             "bytea": "BYTEA"}  # fmt: skip
_KEYED_SQL = {
    "model_info": ("model_name", "model_info.updated_at <= excluded.updated_at", {"first_seen": "LEAST"}),
    "api_keys": ("id", "false", {"revoked_at": "LEAST"}),
    "content_analysis": ("request_id", "content_analysis.analyzed_at <= excluded.analyzed_at", {}),
}
PROGRESS_DDL = (
    "CREATE TABLE IF NOT EXISTS _migrate_progress (source TEXT NOT NULL, tbl TEXT NOT NULL, "
    "last_rowid BIGINT NOT NULL, rows BIGINT NOT NULL, path TEXT, updated_at TEXT NOT NULL, "
    "PRIMARY KEY (source, tbl))",
    "CREATE TABLE IF NOT EXISTS _migrate_ids (source TEXT NOT NULL, tbl TEXT NOT NULL, old_id BIGINT NOT NULL, "
    "new_id BIGINT NOT NULL, PRIMARY KEY (source, tbl, old_id))",
)
_SAVE_PROGRESS = (
    "INSERT INTO _migrate_progress (source, tbl, last_rowid, rows, path, updated_at) VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (source, tbl) DO UPDATE SET last_rowid = excluded.last_rowid, rows = excluded.rows, "
    "path = excluded.path, updated_at = excluded.updated_at"
)
_FIT_ERRORS = (TypeError, ValueError, OverflowError, asyncpg.DataError)


class MigrateError(StorageError):
    """The migration cannot start or go on: a bad source file (``bad_input``), a schema mismatch, a row
    PostgreSQL refuses."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


async def pg_columns(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    """``{column: type word}`` of ``table`` as the target has it now ({} when it has no such table)."""
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' "
        "AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    return {r[0]: _PG_TYPES.get(r[1], "TEXT") for r in rows}


@dataclass
class Table:
    """What is copied of one table: the columns (SQLite's read order) and how the rows are written."""

    name: str
    kind: Kind
    columns: tuple[str, ...]
    convert: list[Convert]
    ts_at: int | None  # index of timestamp in columns, for the partitions of a partitioned table


def plan_table(name: str, kind: Kind, lite: list[str], pg: dict[str, str]) -> Table:
    """What to copy of ``name``: SQLite's columns (``lite``) that PostgreSQL has (``pg``), without the ids
    PostgreSQL assigns; MigrateError when SQLite has a column PostgreSQL lacks."""
    fixed = {"rollup": ROLLUP_COLUMNS, "usage": USAGE_COLUMNS}.get(kind)
    extra = [c for c in lite if c not in pg]
    if extra:
        raise MigrateError(f"{name}: the SQLite file has columns PostgreSQL lacks ({', '.join(extra)})")
    if fixed is not None:
        missing = [c for c in fixed if c not in lite]
        if missing:
            raise MigrateError(f"{name}: the SQLite file lacks {', '.join(missing)}")
        cols = tuple(fixed)
    else:
        keep_id = kind == "keyed"  # api_keys' id is its text key; model_info has none
        cols = tuple(c for c in lite if c != "id" or keep_id)
    convert = [_BY_TYPE["TEXT" if c in JSON_COLUMNS else pg[c]](c) for c in cols]
    ts_at = cols.index("timestamp") if name in PARTITIONED else None
    return Table(name, kind, cols, convert, ts_at)


def _fit(t: Table, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The rows with every value converted to its PostgreSQL column as the store converts records
    (storage/postgres/rows.py: NUL in text becomes U+FFFD ...), or MigrateError naming the row and why."""
    out = []
    end = 1 + len(t.columns)
    for r in rows:
        try:
            out.append((r[0], *(f(v) for f, v in zip(t.convert, r[1:end], strict=True)), *r[end:]))
        except (TypeError, ValueError, OverflowError) as exc:
            raise MigrateError(
                f"{t.name}: the row with rowid {r[0]} cannot be stored in PostgreSQL: {exc}"
            ) from exc
    return out


def _upsert_sql(t: Table) -> str:
    key, newer, special = _KEYED_SQL[t.name]
    marks = ", ".join(f"${i}" for i in range(1, len(t.columns) + 1))
    sets = []
    for c in t.columns:
        if c == key:
            continue
        how = special.get(c)
        if how:  # PostgreSQL's LEAST ignores NULLs: the first time seen, the first revocation
            sets.append(f"{c} = {how}({t.name}.{c}, excluded.{c})")
        else:
            sets.append(f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {t.name}.{c} END")
    return (
        f"INSERT INTO {t.name} ({', '.join(t.columns)}) VALUES ({marks}) "
        f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}"
    )


class Copier:
    """Writes chunks of one source into the target, one transaction each, progress included."""

    def __init__(self, conn: asyncpg.Connection, source: str, path: str) -> None:
        self.conn = conn
        self.source = source
        self.path = path
        self.days: dict[str, set[str]] = {}

    async def load_days(self) -> None:
        for table in PARTITIONED:
            self.days[table] = await partitions.existing_days(self.conn, table)

    async def chunk(self, t: Table, rows: list[tuple[Any, ...]], done: int) -> None:
        """Write ``rows`` (each ``(rowid, *values)``) and the progress after them in one transaction; when a
        value does not fit as it is, redo it once with every value converted."""
        try:
            await self._chunk(t, [r[1:] for r in rows], rows[-1][0], done)
        except _FIT_ERRORS:
            await self._chunk(t, [r[1:] for r in _fit(t, rows)], rows[-1][0], done)

    async def _chunk(self, t: Table, values: list[tuple[Any, ...]], last: int, done: int) -> None:
        created: set[str] = set()
        async with self.conn.transaction():
            if t.ts_at is not None:
                created = await self._ensure_days(t.name, {partitions.day_of(v[t.ts_at]) for v in values})
            await self._write(t, values)
            await self.conn.execute(
                _SAVE_PROGRESS, self.source, t.name, last, done, self.path, iso_utc(time.time())
            )
        self.days.setdefault(t.name, set()).update(created)

    async def _ensure_days(self, table: str, days: set[str | None]) -> set[str]:
        missing = {d for d in days if d is not None} - self.days.get(table, set())
        if missing:
            await self.conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            for day in sorted(missing):
                await partitions.create_day(self.conn, table, day)
        return missing

    async def _write(self, t: Table, values: list[tuple[Any, ...]]) -> None:
        conn = self.conn
        if t.kind == "append":
            await conn.copy_records_to_table(t.name, records=values, columns=t.columns)
        elif t.kind == "text":  # SQLite replaces a repeated request id; so do we
            at = t.columns.index("request_id")
            await conn.execute(
                "DELETE FROM request_text WHERE request_id = ANY($1::text[])", [v[at] for v in values]
            )
            await conn.copy_records_to_table(t.name, records=values, columns=t.columns)
        elif t.kind in ("keyed", "content"):
            await conn.executemany(_upsert_sql(t), values)
        elif t.kind == "alerts":
            await self._alerts(t, values)
        elif t.kind == "transitions":
            await self._transitions(t, values)
        elif t.kind == "rollup":
            typed = [_typed(v, t.columns) for v in values]
            await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
            await conn.execute(rollup_upsert_sql(t.name), *_columns(await _merged(conn, t.name, typed)))
        else:  # usage
            await conn.execute(usage_upsert_sql(), *_columns([_typed(v, t.columns) for v in values]))

    async def _ids(self, table: str, old: list[int]) -> dict[int, int]:
        rows = await self.conn.fetch(
            "SELECT old_id, new_id FROM _migrate_ids WHERE source = $1 AND tbl = $2 AND old_id = ANY($3::bigint[])",
            self.source, table, old,
        )  # fmt: skip
        return {r[0]: r[1] for r in rows}

    async def _alerts(self, t: Table, values: list[tuple[Any, ...]]) -> None:
        known = await self._ids("alerts", [v[-1] for v in values])
        cols = ", ".join(t.columns)
        marks = ", ".join(f"${i}" for i in range(1, len(t.columns) + 1))
        sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(t.columns, 1))
        for v in values:
            *row, old = v
            if old in known:
                await self.conn.execute(
                    f"UPDATE alerts SET {sets} WHERE id = ${len(row) + 1}", *row, known[old]
                )
                continue
            new = await self.conn.fetchval(f"INSERT INTO alerts ({cols}) VALUES ({marks}) RETURNING id", *row)
            await self.conn.execute(
                "INSERT INTO _migrate_ids (source, tbl, old_id, new_id) VALUES ($1, 'alerts', $2, $3)",
                self.source, old, new,
            )  # fmt: skip

    async def _transitions(self, t: Table, values: list[tuple[Any, ...]]) -> None:
        at = t.columns.index("alert_id")
        ids = await self._ids("alerts", list({v[at] for v in values}))
        lost = {v[at] for v in values} - ids.keys()
        if lost:
            raise MigrateError(
                f"alert_transitions: alert ids {sorted(lost)[:5]} are not among the copied alerts"
            )
        rows = [(*v[:at], ids[v[at]], *v[at + 1 :]) for v in values]
        await self.conn.copy_records_to_table(t.name, records=rows, columns=t.columns)
