"""Daily rollups (``rollup_day``), compacted from the hourly ones by the maintenance job, never on the write path;
and, the same way, 5-minute rollups of the last two days (``rollup_5m``) from the minute ones (``Compacted``).

Why: a 30-day summary per model from ``rollup_hour`` merges 720 rows of five histograms per model, about 2.3
million bucket counts added in Python (docs/benchmarks.md, "Queries at 1M rows"); from days it merges 30.
A day row is the exact sum of the hour rows of that UTC day and group (same levels and columns as
``rollup_hour``, storage/rollups.py), so a summary answered from it gives the same counts and histograms,
hence the same percentiles; float sums may differ in the last bits (another order of additions).

**Never stale.** Hour rows still change after their day is compacted (a request that started before
midnight is recorded after it; retention deletes old hours at an hour-aligned cutoff, so a day can lose
part of its hours). Every day row keeps ``source_rows``, the number of hour rows it was built from, and its
``requests`` are their sum. A reader uses the day rows of a day only when, for the level and filters it
reads, the hour rows still have that count and that sum of requests (``usable_days``: one grouped read of
the hour rows' ``requests``, a few ms for 30 days); otherwise it reads that day's hours. Any write to an hour
row adds at least one request and any delete removes a row, so a changed day is always seen (a delete and
an insert that cancel out on both counts at once would need retention and a late write to meet in the
same old day, which they cannot: retention deletes days long finished).

**Compaction** (``compact``, run by ``Retention.run_once`` after its deletes, and by ``ollamon db prune``):
the days before the current UTC day whose day rows do not match their hour rows (or have no hours left)
are rebuilt one day at a time. The hour rows are read and merged on a worker thread with a read-only
connection of its own; the writer then runs one short job per day that checks the hours did not change
meanwhile and replaces that day's rows. So the writer waits for a few small inserts, and the event loop for
nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from storage.base import WriteExecutor
from storage.histogram import BUCKETS, decode, encode
from storage.portable import portable
from storage.rollups import COUNT_COLUMNS, METRICS, ROLLUP_COLUMNS

__all__ = [
    "DAYS",
    "DAY_S",
    "FIVE_MINUTES",
    "TABLE",
    "TABLE_5M",
    "Compacted",
    "Reader",
    "build_day",
    "compact",
    "compact_recent",
    "create_table",
    "stale_days",
    "usable",
    "usable_days",
]

DAY_S = 86400
TABLE = "rollup_day"
TABLE_5M = "rollup_5m"
_LEVELS = (0, 1, 2)


def _insert(table: str) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(ROLLUP_COLUMNS)}, source_rows) "
        f"VALUES ({', '.join('?' * (len(ROLLUP_COLUMNS) + 1))})"
    )


T = TypeVar("T")
Check = dict[int, tuple[int, int]]  # level -> (hour rows, their requests)


def create_table(conn: sqlite3.Connection, table: str = TABLE) -> None:
    """A compacted table (``rollup_day``, ``rollup_5m``): ``rollup_hour``'s columns plus ``source_rows``
    (migration m012). Spelled out,
    not derived from ``METRICS``: a shipped migration keeps making the same schema."""
    metric_columns = "".join(
        f"{m}_n INTEGER NOT NULL DEFAULT 0, {m}_sum REAL NOT NULL DEFAULT 0, {m}_hist BLOB, "
        for m in ("response_time_ms", "ttft_ms", "queue_time_ms", "itl_mean_ms", "tokens_per_second")
    )
    conn.execute(
        f"""
        CREATE TABLE IF NOT EXISTS {table} (
            id INTEGER PRIMARY KEY,
            level INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            model_name TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            success INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            cancelled INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            energy_j_n INTEGER NOT NULL DEFAULT 0,
            energy_j_sum REAL NOT NULL DEFAULT 0,
            {metric_columns}
            source_rows INTEGER NOT NULL DEFAULT 0,
            UNIQUE (level, bucket, model_name, endpoint)
        )
        """
    )


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@dataclass(frozen=True, slots=True)
class Compacted:
    """A coarser rollup table compacted from a finer one: ``size``-second buckets of ``source`` rows,
    kept for every bucket (``recent_s`` None) or only for the last ``recent_s`` seconds."""

    table: str
    source: str
    size: int
    recent_s: float | None = None
    per_job: int = 1  # buckets replaced by one write job


DAYS = Compacted(TABLE, "rollup_hour", DAY_S)
# The dashboard's 24 h trend at 5 m buckets merges 1,440 minute rows; from these, 288 (+ the last hour's
# minutes). Only the last two days are kept: no other query asks for 5 m buckets further back.
FIVE_MINUTES = Compacted(TABLE_5M, "rollup_minute", 300, recent_s=2 * DAY_S, per_job=12)
_PAUSE_S = 0.005  # between two chunks: the merging thread and the writer share the GIL


def _stale(conn: sqlite3.Connection, spec: Compacted, since: int, before: int) -> list[int]:
    """Buckets in [since, before) whose rows differ from their source rows, oldest first: never compacted,
    changed since, or left without source rows (retention); per level, by row count and requests."""
    if not {spec.source, spec.table} <= _tables(conn):
        return []
    args = (since, before)
    src = {
        (int(b), int(lv)): (int(n), int(r))
        for b, lv, n, r in conn.execute(
            f"SELECT bucket - bucket % {spec.size} AS b, level, COUNT(*), SUM(requests) FROM {spec.source} "
            "WHERE level IN (0, 1, 2) AND bucket >= ? AND bucket < ? GROUP BY b, level",
            args,
        )
    }
    mine = {
        (int(b), int(lv)): (int(n), int(r))
        for b, lv, n, r in conn.execute(
            f"SELECT bucket, level, SUM(source_rows), SUM(requests) FROM {spec.table} "
            "WHERE bucket >= ? AND bucket < ? GROUP BY bucket, level",
            args,
        )
    }
    return sorted({k[0] for k in src.keys() | mine.keys() if src.get(k) != mine.get(k)})


def stale_days(conn: sqlite3.Connection, before: int) -> list[int]:
    """Days (UTC starts) before ``before`` whose day rows differ from their hour rows (``_stale``)."""
    return _stale(conn, DAYS, 0, before)


def _build(conn: sqlite3.Connection, spec: Compacted, bucket: int) -> tuple[list[tuple[Any, ...]], Check]:
    """The rows of ``bucket`` (``ROLLUP_COLUMNS`` order plus ``source_rows``) merged from its source rows,
    and the per-level check of those source rows the write job compares before replacing."""
    cols = ["level", "model_name", "endpoint", *COUNT_COLUMNS]
    cols += [f"{m}_{p}" for m in METRICS for p in ("n", "sum", "hist")]
    cursor = conn.execute(
        f"SELECT {', '.join(cols)} FROM {spec.source} WHERE level IN (0, 1, 2) AND bucket >= ? AND bucket < ? "
        "ORDER BY level, model_name, endpoint, bucket",
        (bucket, bucket + spec.size),
    )
    groups: dict[tuple[int, str, str], list[Sequence[Any]]] = {}
    for row in cursor:
        groups.setdefault((row[0], row[1], row[2]), []).append(row)
    out: list[tuple[Any, ...]] = []
    check: Check = {}
    n_counts = len(COUNT_COLUMNS)
    for (level, model, endpoint), rows in groups.items():
        values: list[Any] = [level, bucket, model, endpoint]
        for k in range(n_counts):
            total: Any = 0
            for r in rows:  # in bucket order, as a reader adding the source rows would
                total += r[3 + k]
            values.append(total)
        for j in range(len(METRICS)):
            base = 3 + n_counts + 3 * j
            n = sum(int(r[base]) for r in rows)
            s: float = 0.0
            for r in rows:
                s += r[base + 1]
            values += [n, s, _merged([r[base + 2] for r in rows if r[base + 2]])]
        values.append(len(rows))
        out.append(tuple(values))
        seen = check.get(level, (0, 0))
        check[level] = (seen[0] + len(rows), seen[1] + int(values[4]))
    return out, check


def build_day(conn: sqlite3.Connection, day: int) -> tuple[list[tuple[Any, ...]], Check]:
    """The ``rollup_day`` rows of ``day`` merged from its hour rows, and their check (``_build``)."""
    return _build(conn, DAYS, day)


def _merged(blobs: list[bytes]) -> bytes | None:
    """The sum of serialised histograms (a dense list: one list index per bucket count)."""
    if not blobs:
        return None
    if len(blobs) == 1:
        return blobs[0]
    dense = [0] * BUCKETS
    for blob in blobs:
        idx, cnt = decode(blob)
        for i, c in zip(idx, cnt, strict=True):
            dense[i] += c
    return encode({i: c for i, c in enumerate(dense) if c})


def usable(
    conn: sqlite3.Connection,
    spec: Compacted,
    start: int,
    end: int,
    level: int,
    where: Sequence[str],
    params: Sequence[Any],
) -> set[int]:
    """The buckets in [start, end) whose rows at ``level`` with the conditions ``where`` still equal the
    source rows they were built from: same number of rows, same requests."""
    if start >= end or spec.table not in _tables(conn):
        return set()
    cond = "".join(f" AND {w}" for w in where)
    args = [level, start, end, *params]
    src = {
        int(b): (int(n), int(r))
        for b, n, r in conn.execute(
            f"SELECT bucket - bucket % {spec.size} AS b, COUNT(*), SUM(requests) FROM {spec.source} "
            f"WHERE level = ? AND bucket >= ? AND bucket < ?{cond} GROUP BY b",
            args,
        )
    }
    return {
        int(b)
        for b, n, r in conn.execute(
            f"SELECT bucket, SUM(source_rows), SUM(requests) FROM {spec.table} "
            f"WHERE level = ? AND bucket >= ? AND bucket < ?{cond} GROUP BY bucket",
            args,
        )
        if src.get(int(b)) == (int(n), int(r))
    }


def usable_days(
    conn: sqlite3.Connection, start: int, end: int, level: int, where: Sequence[str], params: Sequence[Any]
) -> set[int]:
    """The days in [start, end) whose day rows still equal their hour rows (``usable``)."""
    return usable(conn, DAYS, start, end, level, where, params)


def _read(path: Path, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
    try:
        return fn(conn)
    finally:
        conn.close()


async def _replace(db: Any, spec: Compacted, built: list[tuple[int, list[tuple[Any, ...]], Check]]) -> int:
    """Write job: replace each built bucket's rows, unless its source rows changed since they were read."""
    sql = portable(db)
    done = 0
    for bucket, rows, check in built:
        now = {
            int(lv): (int(n), int(r))
            for lv, n, r in await sql.run(
                f"SELECT level, COUNT(*), SUM(requests) FROM {spec.source} WHERE level IN (0, 1, 2) "
                "AND bucket >= ? AND bucket < ? GROUP BY level",
                (bucket, bucket + spec.size),
            )
        }
        if now != check:
            continue
        await sql.run(f"DELETE FROM {spec.table} WHERE level IN (0, 1, 2) AND bucket = ?", (bucket,))
        await sql.run_many(_insert(spec.table), rows)
        done += 1
    return done


class Reader(Protocol):
    """Runs ``fn(connection)`` on a read connection of its own and returns what it returns: a SQLite file's
    (``_read``), or PostgreSQL's (storage/postgres/retention.py passes one)."""

    def __call__(self, fn: Callable[[Any], T], /) -> T: ...


def _reader(where: Path | str | Reader) -> Reader:
    if isinstance(where, Path | str):
        return partial(_read, Path(where))
    return where


async def _compact(executor: WriteExecutor, read: Reader, spec: Compacted, now: float) -> int:
    before = int(now // spec.size) * spec.size
    since = 0 if spec.recent_s is None else int((now - spec.recent_s) // spec.size) * spec.size
    if spec.recent_s is not None:  # older buckets are not kept

        async def forget(db: Any) -> None:
            sql = portable(db)
            if spec.table in {
                r[0] for r in await sql.run("SELECT name FROM sqlite_master WHERE type = 'table'")
            }:
                await sql.run(f"DELETE FROM {spec.table} WHERE level IN (0, 1, 2) AND bucket < ?", (since,))

        await executor.execute_write(forget)
    stale = await asyncio.to_thread(read, partial(_stale, spec=spec, since=since, before=before))
    written = 0
    for i in range(0, len(stale), spec.per_job):
        chunk = stale[i : i + spec.per_job]

        def build(conn: Any, buckets: list[int] = chunk) -> list[Any]:
            return [(b, *_build(conn, spec, b)) for b in buckets]

        built = await asyncio.to_thread(read, build)

        async def job(db: Any, b: list[Any] = built) -> int:
            return await _replace(db, spec, b)

        written += await executor.execute_write(job)
        await asyncio.sleep(_PAUSE_S)
    return written


async def compact(executor: WriteExecutor, where: Path | str | Reader, now: float) -> int:
    """Rebuild the stale day rows of every finished UTC day (before the day holding ``now``); returns how
    many days were written. ``where``: the SQLite file, or a ``Reader``. Reads run on a worker thread; each
    day's replacement is one write job (written once for both backends, storage/portable.py)."""
    return await _compact(executor, _reader(where), DAYS, now)


async def compact_recent(executor: WriteExecutor, where: Path | str | Reader, now: float) -> int:
    """The same for the 5-minute rows of the last two days (``FIVE_MINUTES``); returns buckets written."""
    return await _compact(executor, _reader(where), FIVE_MINUTES, now)
