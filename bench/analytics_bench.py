"""Benchmark of the analytics queries on a realistic database: 1,000,000 raw requests over the last 24 h
(written the real way, through ``SQLiteStore.write_batch`` with the rollup hook, 500 per batch) plus 29 more
days of hourly rollups before them, so a 30-day trend has 30 days to read.

Run: ``python bench/analytics_bench.py [--rows 1000000] [--runs 7] [--keep PATH] [--only TEXT]``. Not a test;
it prints a markdown table of medians. Queries end at the newest raw row (not the clock), so a kept database
answers the same windows on a later run. Before the queries the daily rollups are compacted as the proxy's
maintenance does (``--no-compact`` skips it). Target (issue 15): every summary and trend the API and the
dashboard use under 100 ms, on a busy machine too.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.histogram import merge_blobs
from storage.queries import FIGURES, summary, timeseries
from storage.records import iso_utc
from storage.rollups import RAW_COLUMNS, TABLES, Agg, RollupHook, upsert_sql
from storage.sqlite import SQLiteStore
from storage.usage_reads import UsageReads
from storage.writer import Writer
from tests.analytics_gen import make_record

try:  # absent before issue 15: the bench then runs the same queries on a checkout without daily rollups
    from storage import rollup_day
except ImportError:  # pragma: no cover
    rollup_day = None  # type: ignore[assignment]

HOUR = 3600
DAY = 86400


async def write_raw(path: Path, rows: int, now: float) -> float:
    """``rows`` requests spread over the last 24 h; returns rows/s achieved by write_batch with rollups."""
    store = SQLiteStore(path)
    await store.open()
    store.add_hook(RollupHook())
    rng = random.Random(42)
    step = DAY / rows
    spent = 0.0
    batch = 500
    for start in range(0, rows, batch):
        recs = [
            make_record(rng, now - DAY + (start + i) * step, start + i)
            for i in range(min(batch, rows - start))
        ]
        t = time.perf_counter()
        await store.write_batch(recs)
        spent += time.perf_counter() - t
    await store.close()
    return rows / spent


def write_history(path: Path, now: float, days: int, per_group_hour: int) -> int:
    """Hourly rollups (all three levels) for the ``days`` days before the raw day; returns rows written.

    Each model/endpoint/hour takes one of 64 pre-built aggregates of ``per_group_hour`` generated requests
    (building 30 days of them request by request would take longer than the benchmark is worth)."""
    rng = random.Random(7)
    pool = []
    for _ in range(64):
        agg = Agg()
        for i in range(per_group_hour):
            r = make_record(rng, now, i)
            if r.done_reason not in ("load", "unload"):
                agg.add(tuple(getattr(r, c) for c in RAW_COLUMNS))
        pool.append(agg)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("ollamon_hist_merge", 2, merge_blobs, deterministic=True)
    sql = upsert_sql("rollup_hour")
    first = int((now - (days + 1) * DAY) // HOUR * HOUR)
    last = int((now - DAY) // HOUR * HOUR)
    written = 0
    conn.execute("BEGIN")
    for bucket in range(first, last, HOUR):
        groups: dict[tuple[int, str, str], Agg] = {}
        for model in ("llama3.2", "qwen2.5:7b", "mistral"):
            for endpoint in ("/api/chat", "/api/generate", "/v1/chat/completions"):
                agg = rng.choice(pool)
                for key in ((0, model, endpoint), (1, model, ""), (2, "", "")):
                    groups.setdefault(key, Agg()).merge(agg)
        for (level, model, endpoint), agg in groups.items():
            conn.execute(sql, agg.values(("rollup_hour", level, bucket, model, endpoint)))
            written += 1
    conn.execute("COMMIT")
    conn.close()
    return written


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, float]:
    """Median and max wall ms, and median CPU ms of this process (less swayed by a busy machine)."""
    times, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(times), max(times), statistics.median(cpu)


async def compact_days(path: Path, now: float) -> tuple[int, int]:
    """What the proxy's maintenance does (``Retention.run_once``): migrate (m012) and compact the daily
    rollups from the hourly ones and the last two days' 5-minute rollups from the minute ones, through a
    writer. Idempotent: a second call finds nothing stale."""
    store = SQLiteStore(path)
    await store.open()
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()
    try:
        days = await rollup_day.compact(writer, path, now)
        return days, await rollup_day.compact_recent(writer, path, now)
    finally:
        await writer.stop()
        await store.close()


def newest(conn: sqlite3.Connection) -> float:
    """The newest raw timestamp: queries end there, so a kept database answers the same windows later."""
    ts = conn.execute("SELECT MAX(timestamp) FROM inference_metrics").fetchone()[0]
    return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# The dashboard's windows (proxy/dashboard/static/dashboard.js WINDOWS) and its trend figures (REQ_METRICS).
DASHBOARD = {"15 m": (900, "1m"), "1 h": (HOUR, "1m"), "24 h": (DAY, "5m"), "7 d": (7 * DAY, "1h")}
REQ_METRICS = [
    "requests",
    "successful",
    "failed",
    "cancelled",
    "requests_per_s",
    "tokens_per_s",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "response_time_ms_p50",
    "response_time_ms_p95",
    "queue_time_ms_p95",
]


def cases(conn: sqlite3.Connection, path: Path, now: float) -> list[tuple[str, Callable[[], Any]]]:
    """Every summary and trend the API and the dashboard ask for, plus the issue's named ones."""
    usage = UsageReads(path)
    out: list[tuple[str, Callable[[], Any]]] = [
        ("24 h summary, per model (rollups)", lambda: summary(conn, now - DAY, now)),
        ("24 h summary, one model (rollups)", lambda: summary(conn, now - DAY, now, per_model=False)),
        (
            "30 d trend, 1 h buckets, ttft_ms_p95",
            lambda: timeseries(conn, now - 30 * DAY, now, "1h", ["ttft_ms_p95"]),
        ),
        (
            "30 d trend, 1 h buckets, 4 figures",
            lambda: timeseries(
                conn,
                now - 30 * DAY,
                now,
                "1h",
                ["requests", "error_rate", "ttft_ms_p95", "response_time_ms_p99"],
            ),
        ),
        ("30 d summary, per model (rollups)", lambda: summary(conn, now - 30 * DAY, now)),
        ("1 h summary, per model (auto: rollups)", lambda: summary(conn, now - HOUR, now)),
        ("1 h summary, per model (exact=true)", lambda: summary(conn, now - HOUR, now, exact=True)),
        ("5 min summary, per model (auto: exact)", lambda: summary(conn, now - 300, now)),
        ("24 h trend, 1 m buckets, requests", lambda: timeseries(conn, now - DAY, now, "1m", ["requests"])),
    ]
    for name, (seconds, bucket) in DASHBOARD.items():
        out.append((f"dashboard {name}: summary (auto)", lambda s=seconds: summary(conn, now - s, now)))
        out.append(
            (
                f"dashboard {name}: trend, {bucket} buckets, 11 figures",
                lambda s=seconds, b=bucket: timeseries(conn, now - s, now, b, REQ_METRICS),
            )
        )
    out.append(
        (
            "API default trend: 1 h, 1 m, every figure",
            lambda: timeseries(conn, now - HOUR, now, "1m", FIGURES),
        )
    )
    out.append(
        ("dashboard usage panel: 30 d by model", lambda: usage.usage(now - 30 * DAY, now, "model", 50))
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--history-days", type=int, default=29)
    ap.add_argument(
        "--per-group-hour", type=int, default=1500, help="synthetic requests per model/endpoint/hour"
    )
    ap.add_argument("--keep", metavar="PATH", help="build (or reuse) the database here instead of a temp dir")
    ap.add_argument("--only", metavar="TEXT", help="run only the queries whose name contains TEXT")
    ap.add_argument(
        "--no-compact", action="store_true", help="leave rollup_day as it is (a database without day rows)"
    )
    args = ap.parse_args()
    now = time.time()
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.keep) if args.keep else Path(tmp.name) / "bench.db"
    if not path.exists():
        t = time.perf_counter()
        rate = asyncio.run(write_raw(path, args.rows, now))
        print(
            f"wrote {args.rows:,} raw rows in {time.perf_counter() - t:.0f} s ({rate:,.0f} rows/s in write_batch)"
        )
        t = time.perf_counter()
        n = write_history(path, now, args.history_days, args.per_group_hour)
        print(
            f"wrote {n:,} hourly rollup rows for {args.history_days} days in {time.perf_counter() - t:.0f} s"
        )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    now = newest(conn) + 1
    conn.close()
    if not args.no_compact and rollup_day is not None:
        t = time.perf_counter()
        days, fives = asyncio.run(compact_days(path, now))
        print(
            f"compacted {days} day(s) of rollup_day and {fives} 5-minute bucket(s) of rollup_5m "
            f"in {time.perf_counter() - t:.1f} s"
        )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    counts = {
        t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("inference_metrics", *TABLES, "rollup_day", "rollup_5m")
        if t in columns_tables(conn)
    }
    print(
        f"database {path.stat().st_size / 2**20:,.0f} MiB: "
        + ", ".join(f"{t} {n:,}" for t, n in counts.items())
    )
    print(
        f"queries end at the newest row, {iso_utc(now)}; {args.runs} runs each; load average {os.getloadavg()}"
    )
    print(f"command: python bench/analytics_bench.py {' '.join(sys.argv[1:])}")
    print()
    print("| query | median ms | max ms | CPU ms (median) |")
    print("|---|---|---|---|")
    for name, fn in cases(conn, path, now):
        if args.only and args.only not in name:
            continue
        med, worst, cpu = timed(fn, args.runs)
        print(f"| {name} | {med:.1f} | {worst:.1f} | {cpu:.1f} |", flush=True)
    conn.close()
    tmp.cleanup()


def columns_tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


if __name__ == "__main__":
    main()
