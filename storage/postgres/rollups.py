"""The rollups and the hourly usage of each batch, upserted in PostgreSQL with SQLite's merge semantics.

The Python side is SQLite's, imported: ``storage.rollups.aggregate`` turns a batch's inference records into
rollup rows (every level, both tables) and ``storage.usage_rollup.usage_rows`` into ``usage_hour`` rows. Only
the SQL differs: ``$n`` parameters, and columns qualified by table in ``DO UPDATE`` (PostgreSQL would find
them ambiguous with ``excluded``).

Histograms are merged in Python (``storage.histogram``, SQLite's own encoding): the stored histograms of the
batch's rollup rows that already exist are read (both tables in one statement), added into the batch's, and
written back, counts and sums still added by the upsert. Why not in SQL: the ``ollamon_hist_merge`` SQL
function (storage/postgres/schema.py, byte-identical) took ~250 ms a batch, most of the write. A
transaction-level advisory lock, held from that read to the commit, keeps two instances from merging into the
same rows at once (a lost histogram); their raw inserts do not wait for it.

The upserts of both rollup tables and of ``usage_hour`` go as ONE statement (data-modifying CTEs), and the
Python work (``PgRollupHook.prepare``) runs while the store's COPY is on the server: a batch waits for few round
trips and Python and the server work at the same time (docs/benchmarks.md, "PostgreSQL ingest").
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.histogram import merge_blobs, merge_into
from storage.postgres.schema import column_types
from storage.records import InferenceRecord, Record
from storage.rollups import COUNT_COLUMNS, METRICS, RAW_COLUMNS, ROLLUP_COLUMNS, TABLES, Agg, aggregate
from storage.usage_rollup import DIMENSIONS, SUMS, USAGE_COLUMNS, usage_rows

__all__ = ["ROLLUP_LOCK", "PgRollupHook", "PgUsageHook", "rollup_upsert_sql", "usage_upsert_sql"]


_TYPES = column_types()


def _unnest(table: str, columns: Sequence[str], first: int = 1) -> str:
    """``SELECT * FROM unnest($1::type[], ...)``: a whole batch of rows as one statement's parameters (one
    round trip and one plan, instead of one execution per row); parameters numbered from ``first``."""
    arrays = ", ".join(f"${i}::{_TYPES[table][c].lower()}[]" for i, c in enumerate(columns, first))
    return f"SELECT * FROM unnest({arrays})"


def rollup_upsert_sql(table: str, first: int = 1) -> str:
    """One rollup row added into the existing row of its group and bucket: counts and sums added,
    histograms replaced by the merged ones the caller computed under the rollup lock."""
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in COUNT_COLUMNS]
    for m in METRICS:
        sets += [f"{m}_n = {table}.{m}_n + excluded.{m}_n", f"{m}_sum = {table}.{m}_sum + excluded.{m}_sum"]
        sets.append(f"{m}_hist = excluded.{m}_hist")
    return (
        f"INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}) {_unnest(table, ROLLUP_COLUMNS, first)} "
        f"ON CONFLICT (level, bucket, model_name, endpoint) DO UPDATE SET {', '.join(sets)}"
    )


def _existing_sql(table: str, first: int = 1, tag: str = "") -> str:
    hists = ", ".join(f"t.{m}_hist" for m in METRICS)
    keys = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(("bigint", "bigint", "text", "text")))
    return (
        f"SELECT {tag}t.level, t.bucket, t.model_name, t.endpoint, {hists} FROM {table} t "
        f"JOIN unnest({keys}) AS k (level, bucket, model_name, endpoint) USING (level, bucket, model_name, endpoint)"
    )


# Both rollup tables' stored histograms in one round trip (each row tagged with its table's index in TABLES).
_EXISTING_ALL = " UNION ALL ".join(_existing_sql(t, 1 + 4 * i, f"{i} AS tab, ") for i, t in enumerate(TABLES))


def _one_statement(parts: Sequence[tuple[str, int]]) -> str:
    """The upserts ``parts`` (kind, parameter count) as ONE statement: data-modifying CTEs, each run once
    (one round trip for the batch's rollups and usage instead of one per table). Kinds: a rollup table's
    name, or ``usage_hour``."""
    stmts, first = [], 1
    for kind, count in parts:
        stmts.append(usage_upsert_sql(first) if kind == "usage_hour" else rollup_upsert_sql(kind, first))
        first += count
    ctes = ", ".join(f"u{i} AS ({sql})" for i, sql in enumerate(stmts[:-1]))
    return f"WITH {ctes} {stmts[-1]}" if ctes else stmts[-1]


def usage_upsert_sql(first: int = 1) -> str:
    sets = ", ".join(f"{c} = usage_hour.{c} + excluded.{c}" for c in SUMS)
    return (
        f"INSERT INTO usage_hour ({', '.join(USAGE_COLUMNS)}) {_unnest('usage_hour', USAGE_COLUMNS, first)} "
        f"ON CONFLICT (bucket, {', '.join(DIMENSIONS)}) DO UPDATE SET {sets}"
    )


_EXISTING = {t: _existing_sql(t) for t in TABLES}
_HIST_AT = [ROLLUP_COLUMNS.index(f"{m}_hist") for m in METRICS]
# Serialises the read-merge-write of histograms between instances sharing one database (any constant key).
ROLLUP_LOCK = 0x6F6C6C616D6F72
_USAGE_UPSERT = usage_upsert_sql()
_STATEMENTS: dict[tuple[tuple[str, int], ...], str] = {}  # _one_statement by its parts
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


# A batch's rollup groups per table, and its usage_hour rows (``PgRollupHook.prepare``).
Prepared = tuple[dict[str, dict[tuple[Any, ...], Agg]], list[tuple[Any, ...]]]


class PgRollupHook:
    """Adds every batch's inference records to ``rollup_minute`` and ``rollup_hour`` and, with ``usage``, to
    ``usage_hour`` (what ``PgUsageHook`` does, in the same statement as the rollups: one round trip fewer)."""

    def __init__(self, *, usage: bool = False) -> None:
        self.usage = usage
        self.batches = 0

    async def prepare(self, records: Sequence[Record]) -> Prepared | None:
        """The batch's rollup groups and usage rows: Python only, no database. It yields to the event loop
        between its steps, so a COPY the store started just before makes progress meanwhile and the server
        inserts the raw rows while this adds them up."""
        inference = [r for r in records if isinstance(r, InferenceRecord)]
        if not inference:
            return None
        await asyncio.sleep(0)
        raw = [_raw(r) for r in inference]
        await asyncio.sleep(0)
        usage = [_typed(r, USAGE_COLUMNS) for r in usage_rows(inference)] if self.usage else []
        await asyncio.sleep(0)
        grouped: dict[str, dict[tuple[Any, ...], Agg]] = {t: {} for t in TABLES}
        for key, agg in aggregate(raw).items():
            grouped[key[0]][key[1:]] = agg
        return grouped, usage

    async def __call__(self, conn: asyncpg.Connection, records: Sequence[Record]) -> None:
        await self.write(conn, await self.prepare(records))

    async def write(self, conn: asyncpg.Connection, prepared: Prepared | None) -> None:
        """Merge the stored histograms into ``prepared`` (``prepare``'s) and upsert it, under the rollup lock."""
        if prepared is None:
            return
        grouped, usage = prepared
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK)
        if all(grouped.values()):
            await _merge_stored_all(conn, grouped)
        else:
            for table, aggs in grouped.items():
                if aggs:
                    await _merge_stored(conn, table, aggs)
        parts: list[tuple[str, int]] = []
        args: list[list[Any]] = []
        for table, aggs in grouped.items():
            if aggs:
                values = [agg.values((table, *k)) for k, agg in aggs.items()]  # counts ints, sums floats
                parts.append((table, len(ROLLUP_COLUMNS)))
                args += _columns(values)
        if usage:
            parts.append(("usage_hour", len(USAGE_COLUMNS)))
            args += _columns(usage)
        if parts:
            sql = _STATEMENTS.get(tuple(parts))
            if sql is None:
                sql = _STATEMENTS[tuple(parts)] = _one_statement(parts)
            await conn.execute(sql, *args)
        self.batches += 1


_RAW = attrgetter(*RAW_COLUMNS)


def _raw(record: InferenceRecord) -> tuple[Any, ...]:
    """The ``RAW_COLUMNS`` of ``record`` (one C call; a record without one of them gets None there)."""
    try:
        return _RAW(record)
    except AttributeError:
        return tuple(getattr(record, c, None) for c in RAW_COLUMNS)


async def _merge_stored_all(conn: asyncpg.Connection, grouped: dict[str, dict[tuple[Any, ...], Agg]]) -> None:
    """``_merge_stored`` for every table of ``TABLES`` at once (one round trip)."""
    by_index = [grouped[t] for t in TABLES]
    keys = [c for aggs in by_index for c in _columns(list(aggs))]
    for r in await conn.fetch(_EXISTING_ALL, *keys):
        hists = by_index[r[0]][tuple(r[1:5])].hists
        for m, blob in zip(METRICS, r[5:], strict=True):
            merge_into(hists[m], blob)


async def _merge_stored(conn: asyncpg.Connection, table: str, aggs: dict[tuple[Any, ...], Agg]) -> None:
    """Add the histograms already stored for ``aggs``' rows into them, so each histogram is encoded once
    (``_merged`` would encode the batch's, decode both and encode again). Counts and sums stay the batch's:
    the upsert adds those."""
    keys = _columns(list(aggs))
    for r in await conn.fetch(_EXISTING[table], *keys):
        hists = aggs[tuple(r[:4])].hists
        for m, blob in zip(METRICS, r[4:], strict=True):
            merge_into(hists[m], blob)


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
