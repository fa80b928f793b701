"""The analytics queries on PostgreSQL against SQLite, side by side, on the same 1M-row history (issue 16).

Why: the reads are written once in SQLite's SQL and run on PostgreSQL through storage/postgres/sync_conn.py
(and the compatibility aggregates of migration ``p005``); issue 16 asks that the summaries and trends on 1M
rows stay within 2x of SQLite's. The history is bench/analytics_bench.py's, imported, not copied: ``--rows``
raw requests over the last 24 h (the same generator and seed) written through each store's ``write_batch``
(500 a batch, rollups and usage included, so the PostgreSQL load also measures its ingest), plus 29 days of
hourly rollups before them (built in SQLite by ``write_history``, copied into PostgreSQL with COPY). Then
both get the maintenance compaction (``rollup_day``, ``rollup_5m``) and every query the API and the dashboard
ask for (analytics_bench.py's list) runs through ``storage.reads.Reads(path)`` and ``Reads(url)``, the
doors the API uses: medians of ``--runs`` rounds, SQLite and PostgreSQL alternated, and the ratio.

PostgreSQL: ``--url`` is an admin URL (default ``$OLLAMON_TEST_PG_URL`` or postgres@127.0.0.1:5432/test's
server); the bench creates a database per run and drops it after, unless ``--keep`` (it then prints the
name, and ``--db NAME --sqlite PATH`` reuses both without loading).

Run: ``python bench/pg_queries.py [--rows 1000000] [--runs 5] [--sqlite PATH] [--keep] [--db NAME]
[--only TEXT]``. Not a test; prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import analytics_bench as ab  # bench/ is on sys.path when run as a script; it puts the repo root there too
import asyncpg  # type: ignore[import-untyped]

from storage import rollup_day
from storage.browse import RequestQuery
from storage.postgres import PostgresStore
from storage.postgres.rollups import _typed
from storage.postgres.sync_conn import PgSource
from storage.queries import FIGURES, Filters
from storage.reads import Reads
from storage.records import iso_utc
from storage.rollups import ROLLUP_COLUMNS
from storage.usage_reads import UsageReads
from tests.analytics_gen import make_record

HOUR, DAY = ab.HOUR, ab.DAY


async def write_pg_raw(url: str, rows: int, now: float) -> float:
    """The same ``rows`` requests as ``analytics_bench.write_raw`` (same seed and times) through
    ``PostgresStore.write_batch``; returns records/s inside write_batch."""
    store = PostgresStore(url, clock=lambda: now)
    await store.open()
    rng = random.Random(42)
    step = DAY / rows
    spent = 0.0
    batch = 500
    try:
        for start in range(0, rows, batch):
            recs = [
                make_record(rng, now - DAY + (start + i) * step, start + i)
                for i in range(min(batch, rows - start))
            ]
            t = time.perf_counter()
            await store.write_batch(recs)
            spent += time.perf_counter() - t
    finally:
        await store.close()
    return rows / spent


async def copy_history(path: Path, url: str, before: int) -> int:
    """SQLite's hourly history rows (buckets before ``before``, the first raw hour) copied into PostgreSQL."""
    conn = sqlite3.connect(path)
    try:
        rows = [
            _typed(r, ROLLUP_COLUMNS)
            for r in conn.execute(
                f"SELECT {', '.join(ROLLUP_COLUMNS)} FROM rollup_hour WHERE bucket < ?", (before,)
            )
        ]
    finally:
        conn.close()
    pg = await asyncpg.connect(url)
    try:
        await pg.copy_records_to_table("rollup_hour", records=rows, columns=ROLLUP_COLUMNS)
        await pg.execute(
            "VACUUM (ANALYZE)"
        )  # what autovacuum does to insert-only tables (visibility map, stats)
    finally:
        await pg.close()
    return len(rows)


def cases(where: str | Path, now: float) -> list[tuple[str, Callable[[], Any]]]:
    """analytics_bench.py's queries (same names, windows and figures), through ``Reads(where)``."""
    r = UsageReads(where)
    out: list[tuple[str, Callable[[], Any]]] = [
        ("24 h summary, per model (rollups)", lambda: r.summary(now - DAY, now)),
        ("24 h summary, one model (rollups)", lambda: r.summary(now - DAY, now, per_model=False)),
        ("30 d trend, 1 h buckets, ttft_ms_p95", lambda: r.timeseries(now - 30 * DAY, now, "1h", ["ttft_ms_p95"])),
        (
            "30 d trend, 1 h buckets, 4 figures",
            lambda: r.timeseries(
                now - 30 * DAY, now, "1h", ["requests", "error_rate", "ttft_ms_p95", "response_time_ms_p99"]
            ),
        ),
        ("30 d summary, per model (rollups)", lambda: r.summary(now - 30 * DAY, now)),
        ("1 h summary, per model (auto: rollups)", lambda: r.summary(now - HOUR, now)),
        ("1 h summary, per model (exact=true)", lambda: r.summary(now - HOUR, now, exact=True)),
        ("5 min summary, per model (auto: exact)", lambda: r.summary(now - 300, now)),
        ("24 h trend, 1 m buckets, requests", lambda: r.timeseries(now - DAY, now, "1m", ["requests"])),
    ]  # fmt: skip
    for name, (seconds, bucket) in ab.DASHBOARD.items():
        out.append((f"dashboard {name}: summary (auto)", partial(r.summary, now - seconds, now)))
        out.append(
            (
                f"dashboard {name}: trend, {bucket} buckets, 11 figures",
                partial(r.timeseries, now - seconds, now, bucket, ab.REQ_METRICS),
            )
        )
    out.append(
        (
            "API default trend: 1 h, 1 m, every figure",
            lambda: r.timeseries(now - HOUR, now, "1m", list(FIGURES)),
        )
    )
    out.append(("dashboard usage panel: 30 d by model", lambda: r.usage(now - 30 * DAY, now, "model", 50)))  # fmt: skip
    # The rows themselves: the API's and the CLI's request list (newest first, as without Redis), a page of it
    # for one model, and the error list; SQLite walks its rowid backwards, PostgreSQL an index on id.
    out += [
        ("requests: newest 50", lambda: r.recent_requests(RequestQuery(limit=50))),
        ("requests: newest 50 of one model", lambda: r.recent_requests(RequestQuery(Filters(model="mistral:latest")))),
        ("errors: 24 h, grouped, newest 50", lambda: r.errors(now - DAY, now)),
    ]  # fmt: skip
    return out


async def _compact_pg(url: str, now: float) -> tuple[int, int]:
    """What PgRetention runs after its drops: rollup_day and rollup_5m compacted through the store."""
    store = PostgresStore(url, clock=lambda: now)
    await store.open()

    def read(fn: Callable[[Any], Any]) -> Any:
        with PgSource.for_url(url).connection() as conn:
            return fn(conn)

    try:
        return await rollup_day.compact(store, read, now), await rollup_day.compact_recent(store, read, now)
    finally:
        await store.close()


def _pg_newest(url: str) -> float:
    """The newest raw timestamp on PostgreSQL (the same as SQLite's when both hold the same history)."""
    with Reads(url)._connection() as conn:
        ts = conn.execute("SELECT MAX(timestamp) FROM inference_metrics").fetchone()[0]
    return _dt.datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp()


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def build(args: argparse.Namespace, path: Path, db_url: str, fresh_db: bool) -> None:
    """Write whatever of the two databases is missing; print what it took."""
    now = time.time()
    if not path.exists():
        t = time.perf_counter()
        rate = asyncio.run(ab.write_raw(path, args.rows, now))
        print(
            f"SQLite: {args.rows:,} raw rows in {time.perf_counter() - t:.0f} s ({rate:,.0f} rec/s in write_batch)"
        )
        n = ab.write_history(path, now, args.history_days, args.per_group_hour)
        print(f"SQLite: {n:,} hourly history rows ({args.history_days} days)")
        path.with_suffix(".now").write_text(repr(now))  # a PostgreSQL load later needs the same timestamps
    else:
        now = float(path.with_suffix(".now").read_text())
    if fresh_db:
        t = time.perf_counter()
        rate = asyncio.run(write_pg_raw(db_url, args.rows, now))
        print(
            f"PostgreSQL: {args.rows:,} raw rows in {time.perf_counter() - t:.0f} s ({rate:,.0f} rec/s in write_batch)"
        )
        n = asyncio.run(copy_history(path, db_url, int((now - DAY) // HOUR * HOUR)))
        print(f"PostgreSQL: {n:,} hourly history rows copied from SQLite")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--history-days", type=int, default=29)
    ap.add_argument("--per-group-hour", type=int, default=1500)
    default_url = os.environ.get("OLLAMON_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/test"
    ap.add_argument("--url", default=default_url, help="PostgreSQL admin URL (default: %(default)s)")
    ap.add_argument("--sqlite", metavar="PATH", help="build (or reuse) the SQLite file here")
    ap.add_argument("--db", metavar="NAME", help="reuse this PostgreSQL database (kept, not loaded)")
    ap.add_argument("--keep", action="store_true", help="keep the PostgreSQL database the run created")
    ap.add_argument("--only", metavar="TEXT", help="run only the queries whose name contains TEXT")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.sqlite) if args.sqlite else Path(tmp.name) / "bench.db"
    name = args.db or f"ollamon_pgq_{uuid.uuid4().hex[:8]}"
    db_url = f"{args.url.rpartition('/')[0]}/{name}"
    if not args.db:
        asyncio.run(_admin(args.url, f"CREATE DATABASE {name}"))
    try:
        build(args, path, db_url, fresh_db=not args.db)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        now = ab.newest(conn) + 1
        conn.close()
        if abs(_pg_newest(db_url) + 1 - now) > 1e-3:
            sys.exit("the SQLite file and the PostgreSQL database hold different histories")
        t = time.perf_counter()
        days, fives = asyncio.run(ab.compact_days(path, now))
        print(
            f"SQLite: compacted {days} day(s), {fives} 5-minute bucket(s) in {time.perf_counter() - t:.1f} s"
        )
        t = time.perf_counter()
        days, fives = asyncio.run(_compact_pg(db_url, now))
        print(
            f"PostgreSQL: compacted {days} day(s), {fives} 5-minute bucket(s) in {time.perf_counter() - t:.1f} s"
        )
        print(
            f"queries end at the newest row, {iso_utc(now)}; {args.runs} runs each; load average {os.getloadavg()}"
        )
        print(f"command: python bench/pg_queries.py {' '.join(sys.argv[1:])}\n")
        print("| query | SQLite ms (median) | PostgreSQL ms (median) | PostgreSQL / SQLite |")
        print("|---|---:|---:|---:|")
        lite, pg = cases(path, now), cases(db_url, now)
        ratios = []
        for (label, on_lite), (_, on_pg) in zip(lite, pg, strict=True):
            if args.only and args.only not in label:
                continue
            on_pg()  # the first call per statement prepares it and opens the pool: not what is measured
            times: dict[str, list[float]] = {"lite": [], "pg": []}
            for i in range(args.runs):
                for key, fn in (("lite", on_lite), ("pg", on_pg))[:: 1 if i % 2 == 0 else -1]:
                    t = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - t) * 1000)
            a, b = statistics.median(times["lite"]), statistics.median(times["pg"])
            ratios.append(b / a)
            print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)
        if ratios:
            print(f"\nworst ratio {max(ratios):.2f}, median {statistics.median(ratios):.2f}")
    finally:
        if args.keep or args.db:
            print(
                f"kept PostgreSQL database {name} ({db_url}) and {path if args.sqlite else 'no SQLite file'}"
            )
        else:
            asyncio.run(_admin(args.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        tmp.cleanup()


if __name__ == "__main__":
    main()
