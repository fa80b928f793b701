"""Batched ingest into PostgreSQL against SQLite, side by side: records per second through ``Store.write_batch``.

Each round writes the same ``--records`` realistic inference records (every column set, a few models and
endpoints, one in ten failed, ten minutes of timestamps) in batches of ``--batch`` (the writer's default,
500) into a fresh SQLite file and a fresh PostgreSQL database, in alternating order; the clock covers
``write_batch`` only: row conversion, the inserts (binary COPY on PostgreSQL), the rollup and usage upserts
and the commit. ``--writer`` adds rows that go through ``storage.writer.Writer`` (submit everything, then
``stop()`` drains it), i.e. what ``ollamon serve`` does after a response. Medians over rounds, and the ratio.

PostgreSQL: ``--url`` (an admin URL; default ``$OLLAMON_TEST_PG_URL`` or postgres@127.0.0.1:5432), on which the
bench creates and drops a database of its own per round. SQLite: a temporary file, WAL, synchronous=NORMAL.

``--stages`` adds, for the PostgreSQL rounds, where ``write_batch``'s wall time went: each statement it waited
for (the COPYs, the rollup and usage statement, BEGIN, COMMIT, the pool's reset), in microseconds per record,
and the process CPU per record (the Python side: rows, rollup aggregation, asyncpg's encoding).

Run: ``python bench/pg_ingest.py [--records 20000] [--batch 500] [--rounds 5] [--writer] [--stages] [--url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.postgres import PostgresStore
from storage.records import ErrorRecord, InferenceRecord, iso_utc
from storage.sqlite import SQLiteStore
from storage.writer import Writer

MODELS = ("llama3.2:1b", "qwen3:0.6b", "gemma3:4b", "mistral:7b")
ENDPOINTS = ("/api/chat", "/api/generate", "/v1/chat/completions")


def records(n: int, start: float) -> list[InferenceRecord]:
    out = []
    for i in range(n):
        failed = i % 10 == 0
        out.append(
            InferenceRecord(
                timestamp=iso_utc(start + i * 600 / n),
                request_id=uuid.uuid4().hex,
                model_name=MODELS[i % len(MODELS)],
                prompt_tokens=100 + i % 50,
                completion_tokens=200 + i % 70,
                total_tokens=300 + i % 120,
                response_time_ms=800.0 + (i * 37) % 2000,
                queue_time_ms=0.5 + i % 7,
                processing_time_ms=790.0 + (i * 37) % 2000,
                tokens_per_second=20.0 + i % 40,
                prompt_length=400 + i % 100,
                response_length=900 + i % 300,
                success=not failed,
                error_message="upstream said no" if failed else None,
                model_version="sha256:abc",
                temperature=0.7,
                metadata={"options": {"temperature": 0.7}, "i": i},
                endpoint=ENDPOINTS[i % len(ENDPOINTS)],
                status_code=500 if failed else 200,
                stream=True,
                ttft_ms=50.0 + i % 300,
                itl_mean_ms=20.0 + i % 15,
                itl_p95_ms=30.0 + i % 20,
                itl_max_ms=90.0 + i % 50,
                done_reason="stop",
                token_source="ollama",
                client_addr="127.0.0.1",
                user_agent="bench",
                user_id=f"u{i % 20}",
                api_key_id=f"k{i % 5}",
                team=("red", "blue")[i % 2],
                cost_usd=0.001,
                stop=["\n\n"],
                error=ErrorRecord(iso_utc(start), None, "upstream", "no") if failed else None,
            )
        )
    return out


async def timed_batches(store: Any, recs: list[InferenceRecord], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(recs), batch):
        await store.write_batch(recs[i : i + batch])
    return time.perf_counter() - started


async def timed_writer(store: Any, recs: list[InferenceRecord], batch: int) -> float:
    writer = Writer(store, queue_size=len(recs) + 1, batch_rows=batch, flush_interval_s=0.05)
    await writer.start()
    started = time.perf_counter()
    for r in recs:
        writer.submit(r)
    await writer.stop()
    return time.perf_counter() - started


async def on_sqlite(run: Callable[[Any], Awaitable[float]]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        await store.open()
        try:
            return await run(store)
        finally:
            await store.close()


async def on_postgres(admin_url: str, run: Callable[[Any], Awaitable[float]]) -> float:
    name = f"ollamon_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        store = PostgresStore(f"{admin_url.rpartition('/')[0]}/{name}")
        await store.open()
        try:
            return await run(store)
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


STAGES: dict[str, float] = collections.defaultdict(float)  # wall seconds per statement kind, every store
STAGES_PG: dict[str, float] = collections.defaultdict(float)  # the same, PostgreSQL's timed batches only


def _timed_method(cls: Any, name: str, label: Callable[[tuple[Any, ...]], str]) -> None:
    """Wrap ``cls.name`` (an asyncpg coroutine method) to add its wall time to ``STAGES[label(args)]``."""
    orig = getattr(cls, name)

    async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await orig(self, *args, **kwargs)
        finally:
            STAGES[label(args)] += time.perf_counter() - started

    setattr(cls, name, timed)


def _watch_stages() -> None:
    from asyncpg.connection import Connection  # type: ignore[import-untyped]

    def first_words(args: tuple[Any, ...]) -> str:
        return " ".join(str(args[0]).split()[:4])[:48]

    _timed_method(Connection, "execute", first_words)
    _timed_method(Connection, "fetch", first_words)
    _timed_method(Connection, "copy_records_to_table", lambda a: f"COPY {a[0]}")  # BEGIN, COMMIT: execute


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--writer", action="store_true", help="also time the path through storage.writer.Writer")
    ap.add_argument("--stages", action="store_true", help="where PostgreSQL's write_batch time goes")
    default_url = os.environ.get("OLLAMON_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    ap.add_argument("--url", default=default_url, help="PostgreSQL admin URL (default: %(default)s)")
    a = ap.parse_args()
    modes: dict[str, Callable[[Any, list[InferenceRecord], int], Awaitable[float]]] = {
        "write_batch": timed_batches
    }
    if a.writer:
        modes["Writer"] = timed_writer
    results: dict[tuple[str, str], list[float]] = {}
    if a.stages:
        _watch_stages()
    for rnd in range(a.rounds):
        for mode, timed in modes.items():
            order = ("sqlite", "postgres") if rnd % 2 == 0 else ("postgres", "sqlite")
            for backend in order:
                recs = records(a.records, time.time() - 600)

                async def run(
                    store: Any, recs: list[InferenceRecord] = recs, timed: Any = timed, mode: str = mode
                ) -> float:
                    before, cpu = STAGES.copy(), time.process_time()
                    secs = float(await timed(store, recs, a.batch))
                    if isinstance(store, PostgresStore) and mode == "write_batch":
                        for k, v in STAGES.items():  # the timed batches' statements only
                            STAGES_PG[k] += v - before.get(k, 0.0)
                        STAGES_PG["wall"] += secs
                        STAGES_PG["cpu"] += time.process_time() - cpu
                    return secs

                secs = await (on_sqlite(run) if backend == "sqlite" else on_postgres(a.url, run))
                results.setdefault((mode, backend), []).append(a.records / secs)
                print(
                    f"round {rnd + 1} {mode:<11} {backend:<8} {a.records / secs:>10,.0f} rec/s",
                    file=sys.stderr,
                )
    print(f"\n`python bench/pg_ingest.py --records {a.records} --batch {a.batch} --rounds {a.rounds}"
          f"{' --writer' if a.writer else ''}` ({os.cpu_count()} CPUs; PostgreSQL and the bench on one machine)\n")  # fmt: skip
    print("| path | SQLite rec/s (median) | PostgreSQL rec/s (median) | PostgreSQL / SQLite |")
    print("|---|---:|---:|---:|")
    for mode in modes:
        lite = statistics.median(results[(mode, "sqlite")])
        pg = statistics.median(results[(mode, "postgres")])
        print(f"| {mode}, batches of {a.batch} | {lite:,.0f} | {pg:,.0f} | {pg / lite:.2f} |")
    if a.stages:
        n = a.records * a.rounds
        print(
            "\nPostgreSQL write_batch, microseconds per record (all rounds; statements include their wait):\n"
        )
        print("| stage | us/record |\n|---|---:|")
        print(f"| wall, write_batch | {STAGES_PG.pop('wall') / n * 1e6:.1f} |")
        print(
            f"| process CPU (Python: rows, rollups; asyncpg's encoding) | {STAGES_PG.pop('cpu') / n * 1e6:.1f} |"
        )
        for label, secs in sorted(STAGES_PG.items(), key=lambda kv: -kv[1]):
            if secs / n * 1e6 >= 0.05:
                print(f"| {label.replace('|', '/')} | {secs / n * 1e6:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
