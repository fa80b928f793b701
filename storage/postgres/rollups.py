"""The rollups and the hourly usage of each batch, upserted in PostgreSQL with SQLite's merge semantics.

The Python side is SQLite's, imported: ``storage.rollups.aggregate`` turns a batch's inference records into
rollup rows (every level, both tables) and ``storage.usage_rollup.usage_rows`` into ``usage_hour`` rows. Only
the SQL differs: ``$n`` parameters, and columns qualified by table in ``DO UPDATE`` (PostgreSQL would find
them ambiguous with ``excluded``).

Histograms are merged in Python with ``storage.histogram.merge_blobs`` (SQLite's own merge): the batch's
rollup rows that already exist are read, merged, and written back, counts and sums still added by the upsert.
Why not in SQL: the ``ollamon_hist_merge`` SQL function (storage/postgres/schema.py, byte-identical) took
~250 ms a batch, most of the write. A transaction-level advisory lock, held from that read to the commit,
keeps two instances from merging into the same rows at once (a lost histogram); their raw inserts do not
wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.histogram import merge_blobs
from storage.postgres.schema import column_types
from storage.records import InferenceRecord, Record
from storage.rollups import COUNT_COLUMNS, METRICS, RAW_COLUMNS, ROLLUP_COLUMNS, TABLES, aggregate
from storage.usage_rollup import DIMENSIONS, SUMS, USAGE_COLUMNS, usage_rows

__all__ = ["ROLLUP_LOCK", "PgRollupHook", "PgUsageHook", "rollup_upsert_sql", "usage_upsert_sql"]


_TYPES = column_types()


def _unnest(table: str, columns: Sequence[str]) -> str:
    """``SELECT * FROM unnest($1::type[], ...)``: a whole batch of rows as one statement's parameters (one
    round trip and one plan, instead of one execution per row)."""
    arrays = ", ".join(f"${i}::{_TYPES[table][c].lower()}[]" for i, c in enumerate(columns, 1))
    return f"SELECT * FROM unnest({arrays})"


def rollup_upsert_sql(table: str) -> str:
    """One rollup row added into the existing row of its group and bucket: counts and sums added,
    histograms replaced by the merged ones the caller computed under the rollup lock."""
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in COUNT_COLUMNS]
    for m in METRICS:
        sets += [f"{m}_n = {table}.{m}_n + excluded.{m}_n", f"{m}_sum = {table}.{m}_sum + excluded.{m}_sum"]
        sets.append(f"{m}_hist = excluded.{m}_hist")
    return (
        f"INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}) {_unnest(table, ROLLUP_COLUMNS)} "
        f"ON CONFLICT (level, bucket, model_name, endpoint) DO UPDATE SET {', '.join(sets)}"
    )


def _existing_sql(table: str) -> str:
    hists = ", ".join(f"t.{m}_hist" for m in METRICS)
    return (
        f"SELECT t.level, t.bucket, t.model_name, t.endpoint, {hists} FROM {table} t "
        "JOIN unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS k (level, bucket, model_name, endpoint) "
        "USING (level, bucket, model_name, endpoint)"
    )


def usage_upsert_sql() -> str:
    sets = ", ".join(f"{c} = usage_hour.{c} + excluded.{c}" for c in SUMS)
    return (
        f"INSERT INTO usage_hour ({', '.join(USAGE_COLUMNS)}) {_unnest('usage_hour', USAGE_COLUMNS)} "
        f"ON CONFLICT (bucket, {', '.join(DIMENSIONS)}) DO UPDATE SET {sets}"
    )


_ROLLUP_UPSERTS = {t: rollup_upsert_sql(t) for t in TABLES}
_EXISTING = {t: _existing_sql(t) for t in TABLES}
_HIST_AT = [ROLLUP_COLUMNS.index(f"{m}_hist") for m in METRICS]
# Serialises the read-merge-write of histograms between instances sharing one database (any constant key).
ROLLUP_LOCK = 0x6F6C6C616D6F72
_USAGE_UPSERT = usage_upsert_sql()
_FLOATS = frozenset({"energy_j_sum", *(f"{m}_sum" for m in METRICS), "cost_usd", "cloud_equiv_usd", "energy_j",
                     "energy_cost_usd"})  # fmt: skip


def _typed(row: Sequence[Any], columns: Sequence[str]) -> tuple[Any, ...]:
    """asyncpg binds exactly: sums that happen to be ints go as floats, counts as ints."""
    return tuple(
        (float(v) if c in _FLOATS else int(v))
        if isinstance(v, int | float) and not isinstance(v, bool)
        else v
        for c, v in zip(columns, row, strict=True)
    )


class PgRollupHook:
    """Adds every batch's inference records to ``rollup_minute`` and ``rollup_hour``."""

    def __init__(self) -> None:
        self.batches = 0

    async def __call__(self, conn: asyncpg.Connection, records: Sequence[Record]) -> None:
        rows = [
            tuple(getattr(r, c, None) for c in RAW_COLUMNS) for r in records if isinstance(r, InferenceRecord)
        ]
        if not rows:
            return
        grouped: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLES}
        for key, agg in aggregate(rows).items():
            grouped[key[0]].append(agg.values(key))  # counts are ints, sums floats already (Agg)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        for table, values in grouped.items():
            if values:
                await conn.execute(_ROLLUP_UPSERTS[table], *_columns(await _merged(conn, table, values)))
        self.batches += 1


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows turned into one list per column (the unnest statements' parameters)."""
    return [list(c) for c in zip(*rows, strict=True)]


async def _merged(
    conn: asyncpg.Connection, table: str, values: list[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """``values`` with each histogram merged into the one already stored for its row, if any."""
    keys = _columns([v[:4] for v in values])
    stored = {tuple(r[:4]): tuple(r[4:]) for r in await conn.fetch(_EXISTING[table], *keys)}
    if not stored:
        return values
    out = []
    for v in values:
        old = stored.get(tuple(v[:4]))
        if old is None:
            out.append(v)
            continue
        row = list(v)
        for at, blob in zip(_HIST_AT, old, strict=True):
            row[at] = merge_blobs(blob, row[at])
        out.append(tuple(row))
    return out


class PgUsageHook:
    """Adds every batch's inference records to ``usage_hour``."""

    def __init__(self) -> None:
        self.batches = 0

    async def __call__(self, conn: asyncpg.Connection, records: Sequence[Record]) -> None:
        rows = usage_rows(records)
        if rows:
            await conn.execute(_USAGE_UPSERT, *_columns([_typed(r, USAGE_COLUMNS) for r in rows]))
            self.batches += 1
