"""``ollamon db migrate`` throughput: rows per second copying a SQLite file of ``--records`` requests into PostgreSQL.

The SQLite file is written once by SQLiteStore (bench/pg_ingest.py's realistic records: every column set, four
models, three endpoints, one in ten failed with an error row, ten minutes of timestamps; the prompt and response
text kept), so it holds ``--records`` inference rows, as many request_text rows, a tenth as many error rows and
the rollups. Each round migrates it into a fresh database (``--url`` is an admin URL; the bench creates and
drops its databases) with ``--chunk`` rows per transaction; the clock covers ``migrate()`` whole: opening and
migrating the target, counting, reading SQLite, the COPYs, the rollup merges and the progress rows. Prints
rows/s over all rows copied and over the inference rows alone; medians over rounds.

Run: ``python bench/db_migrate_bench.py [--records 100000] [--chunk 5000] [--rounds 3] [--url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pg_ingest import records
from storage.postgres.from_sqlite import migrate
from storage.sqlite import SQLiteStore


async def build(path: Path, n: int) -> None:
    store = SQLiteStore(path, store_text=True)
    await store.open()
    try:
        recs = records(n, time.time() - 3600)
        for r in recs:
            r.prompt_text, r.response_text = f"prompt {r.request_id}", "an answer " * 20
        for i in range(0, n, 500):
            await store.write_batch(recs[i : i + 500])
    finally:
        await store.close()


async def one_round(admin_url: str, path: Path, chunk: int) -> tuple[float, int, int]:
    name = f"ollamon_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        started = time.perf_counter()
        result = await migrate(path, f"{admin_url.rpartition('/')[0]}/{name}", chunk=chunk)
        took = time.perf_counter() - started
        return took, result.copied, result.tables["inference_metrics"].copied
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    default_url = os.environ.get("OLLAMON_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    ap.add_argument("--url", default=default_url, help="PostgreSQL admin URL (default: %(default)s)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "source.db"
        t0 = time.perf_counter()
        await build(path, a.records)
        print(
            f"built {a.records:,} requests in {time.perf_counter() - t0:.1f} s ({path.stat().st_size >> 20} MiB)"
        )
        runs = []
        for r in range(a.rounds):
            took, rows, inference = await one_round(a.url, path, a.chunk)
            runs.append((took, rows, inference))
            print(f"round {r + 1}: {rows:,} rows in {took:.2f} s = {rows / took:,.0f} rows/s "
                  f"({inference / took:,.0f} inference rows/s)")  # fmt: skip
    took = statistics.median(t for t, _, _ in runs)
    rows, inference = runs[0][1], runs[0][2]
    print(
        f"median: {rows:,} rows in {took:.2f} s = {rows / took:,.0f} rows/s; {inference / took:,.0f} inference rows/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
