"""Benchmark of the analytics queries on a realistic database: 1,000,000 raw requests over the last 24 h
(written the real way, through ``SQLiteStore.write_batch`` with the rollup hook, 500 per batch) plus 29 more
days of hourly rollups before them, so a 30-day trend has 30 days to read.

Run: ``python bench/analytics_bench.py [--rows 1000000] [--runs 7] [--keep PATH]``. Not a test; it prints a
table of medians. Targets (issue 4): 24 h summary with per-model breakdown < 200 ms; 30-day trend at 1 h
buckets < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
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
from storage.queries import summary, timeseries
from storage.rollups import RAW_COLUMNS, TABLES, Agg, RollupHook, upsert_sql
from storage.sqlite import SQLiteStore
from tests.analytics_gen import make_record

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


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    times = []
    result = None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--history-days", type=int, default=29)
    ap.add_argument(
        "--per-group-hour", type=int, default=1500, help="synthetic requests per model/endpoint/hour"
    )
    ap.add_argument("--keep", metavar="PATH", help="build (or reuse) the database here instead of a temp dir")
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
    counts = {
        t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("inference_metrics", *TABLES)
    }
    print(
        f"database {path.stat().st_size / 2**20:,.0f} MiB: "
        + ", ".join(f"{t} {n:,}" for t, n in counts.items())
    )
    now = time.time()
    cases: list[tuple[str, Callable[[], Any]]] = [
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
    print()
    print(f"{'query':<44}{'median ms':>11}{'max ms':>9}  {'target':>8}")
    print("-" * 76)
    for name, fn in cases:
        med, worst, _ = timed(fn, args.runs)
        target = "< 200" if name.startswith(("24 h summary, per", "30 d trend, 1 h buckets, ttft")) else ""
        print(f"{name:<44}{med:>11.1f}{worst:>9.1f}  {target:>8}")
    conn.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
