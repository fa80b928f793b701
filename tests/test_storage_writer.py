"""The writer's guarantees against a real SQLite file: batching, draining, overflow, failures, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from storage.base import Health
from storage.errors import StoreUnavailableError
from storage.records import InferenceRecord, Record
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.storage_rows import fetch_errors, fetch_requests


def rec(i: int, **over: Any) -> InferenceRecord:
    return InferenceRecord(
        timestamp=f"2026-11-26T23:00:00.{i % 1000:03d}Z",
        request_id=f"req-{i}",
        model_name="m",
        endpoint="/api/chat",
        prompt_tokens=i,
        **over,
    )


class RecordingStore:
    """A real SQLiteStore that also records each batch size, and can be slowed down or failed on demand."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.batch_sizes: list[int] = []
        self.delay_s = 0.0
        self.fail_next = 0

    async def open(self) -> None:
        await self.inner.open()

    async def write_batch(self, records: Sequence[Record]) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreUnavailableError("simulated outage")
        await self.inner.write_batch(records)
        self.batch_sizes.append(len(records))

    async def health(self) -> Health:
        return await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    s = RecordingStore(SQLiteStore(tmp_path / "w.db", busy_timeout_ms=50))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_batches_are_one_transaction_per_batch_rows(store: RecordingStore) -> None:
    n, batch_rows = 1250, 500
    writer = Writer(store, batch_rows=batch_rows, flush_interval_s=0.3)
    for i in range(n):
        assert writer.submit(rec(i))
    async with writer:
        await eventually(lambda: _eq(writer.written, n))
    assert store.batch_sizes == [500, 500, 250]
    assert len(store.batch_sizes) == math.ceil(n / batch_rows)
    assert await store.inner.count("inference_metrics") == n
    stats = writer.stats()
    assert stats["batches"] == 3 and stats["written"] == n and stats["dropped"] == 0 and stats["lost"] == 0
    assert stats["last_batch_ms"] is not None and len(writer.batch_durations_ms) == 3
    assert stats["batch_ms_p99"] == pytest.approx(max(writer.batch_durations_ms[-3:]), rel=0.05)


async def _eq(a: int, b: int) -> bool:
    return a == b


async def test_single_row_is_flushed_by_time(store: RecordingStore) -> None:
    async with Writer(store, batch_rows=500, flush_interval_s=0.05) as writer:
        started = time.monotonic()
        writer.submit(rec(1))
        await eventually(lambda: _count(store, 1), timeout_s=2.0)
        elapsed = time.monotonic() - started
        assert writer.stats()["running"] is True  # written by the timer, not by stop()
    assert 0.04 <= elapsed < 2.0
    assert store.batch_sizes == [1]


async def _count(store: RecordingStore, n: int) -> bool:
    return await store.inner.count("inference_metrics") == n


async def test_stop_drains_everything_queued(store: RecordingStore) -> None:
    writer = Writer(store, queue_size=10000, batch_rows=500)
    await writer.start()
    accepted = sum(writer.submit(rec(i)) for i in range(10000))
    assert accepted == 10000
    assert writer.stats()["queue_depth"] > 0  # nothing written yet: stop() must do it
    await writer.stop()
    assert await store.inner.count("inference_metrics") == 10000
    assert writer.stats()["written"] == 10000 and writer.stats()["queue_depth"] == 0
    assert writer.stats()["running"] is False
    assert not writer.submit(rec(10001))  # refused after stop, and counted
    assert writer.dropped == 1
    await writer.stop()  # idempotent
    assert writer.stats()["queue_depth"] == 0


async def test_overflow_is_counted_and_submit_never_blocks(
    store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.delay_s = 0.2
    caplog.set_level(logging.WARNING, logger="storage.writer")
    writer = Writer(store, queue_size=10, batch_rows=5, flush_interval_s=0.01)
    results: list[bool] = []
    times: list[float] = []
    async with writer:
        for i in range(200):
            t0 = time.perf_counter()
            results.append(writer.submit(rec(i)))
            times.append(time.perf_counter() - t0)
            if i % 20 == 0:
                await asyncio.sleep(0)
    accepted = sum(results)
    assert writer.dropped == 200 - accepted > 0
    assert writer.written == accepted == await store.inner.count("inference_metrics")
    # Synchronous, so never waiting on the slow store: tiny in the median, and no call stalls (the max allows
    # for an OS preemption on a busy machine).
    assert statistics.median(times) < 0.0001 and max(times) < 0.02
    drops = [r for r in caplog.records if "dropping records" in r.getMessage()]
    assert len(drops) == 1  # rate-limited: once per 10 s, however many drops
    assert "dropped so far" in drops[0].getMessage()


class Exploding:
    request_id = "req-boom"

    def build(self) -> Record:
        raise ValueError("cannot decode this body")


async def test_build_that_raises_becomes_internal_error(
    store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="storage.writer")
    async with Writer(store, flush_interval_s=0.01) as writer:
        writer.submit(rec(1))
        writer.submit(Exploding())
        writer.submit(rec(2))
    assert await store.inner.count("inference_metrics") == 2
    errors = await fetch_errors(store.inner)
    assert len(errors) == 1
    err = errors[0]
    assert err["error_type"] == "internal" and err["severity"] == "error"
    assert err["request_id"] == "req-boom"
    assert "ValueError: cannot decode this body" in err["error_message"]
    assert "Traceback" in err["stack_trace"] and "cannot decode this body" in err["stack_trace"]
    assert writer.build_errors == 1 and writer.lost == 0
    assert any("building a record" in r.getMessage() for r in caplog.records)


async def test_rejected_record_is_replaced_and_others_written(store: RecordingStore) -> None:
    async with Writer(store, flush_interval_s=0.01) as writer:
        writer.submit(rec(1))
        writer.submit(rec(2, top_p=object()))
        writer.submit(rec(3))
    assert [r["request_id"] for r in await fetch_requests(store.inner)] == ["req-3", "req-1"]
    errors = await fetch_errors(store.inner)
    assert len(errors) == 1 and errors[0]["request_id"] == "req-2" and errors[0]["error_type"] == "internal"
    assert "rejected" in errors[0]["error_message"]
    assert writer.rejected == 1 and writer.lost == 0


async def test_store_failing_for_a_while_then_recovering_loses_nothing(
    store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A real lock held by another connection makes writes fail with 'database is locked'."""
    caplog.set_level(logging.WARNING, logger="storage.writer")
    other = sqlite3.connect(store.inner.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    writer = Writer(store, batch_rows=50, flush_interval_s=0.01, backoff_initial_s=0.02, backoff_max_s=0.1)
    try:
        async with writer:
            for i in range(300):
                assert writer.submit(rec(i))
            await eventually(lambda: _eq(writer.failed_writes >= 4, True))
            for i in range(300, 400):  # the queue keeps accepting during the outage
                assert writer.submit(rec(i))
            assert writer.written == 0
            other.execute("COMMIT")
            await eventually(lambda: _count(store, 400))
    finally:
        other.close()
    stats = writer.stats()
    assert stats["written"] == 400 and stats["lost"] == 0 and stats["dropped"] == 0
    assert stats["last_error"] is None and stats["write_failing"] is False  # cleared on recovery
    assert (
        stats["last_outage"]["cause"] == "database is locked" and stats["last_outage"]["failed_writes"] >= 4
    )
    failed_logs = [r for r in caplog.records if "store write failed" in r.getMessage()]
    assert len(failed_logs) == 1  # once per outage, not once per retry
    assert any("recovered" in r.getMessage() for r in caplog.records)
    ids = sorted(int(r["request_id"][4:]) for r in await fetch_requests(store.inner, limit=1000))
    assert ids == list(range(400))  # each exactly once


async def test_simulated_outage_retries_same_batch(store: RecordingStore) -> None:
    store.fail_next = 5
    async with Writer(store, batch_rows=1000, flush_interval_s=0.01, backoff_initial_s=0.01) as writer:
        for i in range(30):
            writer.submit(rec(i))
        await eventually(lambda: _count(store, 30))
    assert writer.failed_writes == 5 and writer.lost == 0 and writer.written == 30


async def test_stop_with_dead_store_counts_lost(
    store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="storage.writer")
    other = sqlite3.connect(store.inner.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        writer = Writer(
            store, batch_rows=10, flush_interval_s=0.01, stop_grace_retries=2, backoff_initial_s=5.0
        )
        await writer.start()
        for i in range(35):
            writer.submit(rec(i))
        await eventually(lambda: _eq(writer.failed_writes >= 1, True))
        t0 = time.monotonic()
        await writer.stop()
        assert time.monotonic() - t0 < 5.0  # the 5 s back-off is cut short by stop()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert writer.lost == 35 and writer.written == 0
    assert any("35 records lost" in r.getMessage() for r in caplog.records)
    assert await store.inner.count("inference_metrics") == 0


async def test_write_failures_are_reported_while_they_last_dated_from_the_attempt(tmp_path: Path) -> None:
    """A lock makes each attempt wait busy_timeout before failing: the outage starts when the first failing
    attempt began, the cause is SQLite's own words, and both clear once a write succeeds."""
    store = SQLiteStore(tmp_path / "b.db", busy_timeout_ms=1000)
    await store.open()
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    writer = Writer(store, flush_interval_s=0.01, backoff_initial_s=0.05, backoff_max_s=0.1)
    try:
        async with writer:
            before = time.time()
            writer.submit(rec(1))
            await eventually(lambda: _eq(writer.failed_writes >= 1, True))
            noticed = time.time()
            stats = writer.stats()
            assert stats["write_failing"] is True and writer.outage.cause == "database is locked"
            since = _epoch(stats["failing_since"])
            # Dated from the attempt (before the 1 s busy wait), not from when it gave up.
            assert before - 0.01 <= since <= noticed - 0.9
            assert stats["last_error"]["message"].endswith("database is locked")
            assert since <= _epoch(stats["last_error"]["at"]) <= noticed + 0.01
            await asyncio.sleep(0.5)
            other.execute("COMMIT")
            await eventually(lambda: _count_in(store, 1))
            recovered = time.time()
            stats = writer.stats()
            assert stats["write_failing"] is False and stats["failing_since"] is None
            assert stats["last_error"] is None and writer.outage.cause is None
            outage = stats["last_outage"]
            assert outage["cause"] == "database is locked" and outage["started_at"] == _iso(since)
            assert noticed + 0.5 - before - 0.05 <= outage["duration_s"] <= recovered - before + 0.05
    finally:
        other.close()
        await store.close()


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def _iso(epoch: float) -> str:
    from storage.records import iso_utc

    return iso_utc(epoch)


async def _count_in(store: SQLiteStore, n: int) -> bool:
    return await store.count("inference_metrics") == n


async def test_disk_full_is_an_outage_then_everything_is_written(tmp_path: Path) -> None:
    """SQLITE_FULL for real: the database may not grow past its current size (max_page_count, which SQLite
    keeps per connection, so it is set on the writer's own). Writes fail with 'database or disk is full',
    the queue holds the records, and once there is room again every one is written exactly once."""
    store = SQLiteStore(tmp_path / "full.db", busy_timeout_ms=50)
    await store.open()
    conn = store._writer_conn()
    (pages,) = await (await conn.execute("PRAGMA page_count")).fetchone()
    await conn.execute(f"PRAGMA max_page_count={pages}")
    writer = Writer(store, batch_rows=100, flush_interval_s=0.01, backoff_initial_s=0.02, backoff_max_s=0.05)
    try:
        async with writer:
            for i in range(300):
                assert writer.submit(rec(i, metadata={"pad": "x" * 500}))
            await eventually(lambda: _eq(writer.failed_writes >= 3, True))
            assert writer.outage.cause == "database or disk is full" and writer.written == 0
            await conn.execute("PRAGMA max_page_count=1073741823")
            await eventually(lambda: _count_in(store, 300))
        stats = writer.stats()
        assert stats["written"] == 300 and stats["lost"] == stats["dropped"] == stats["rejected"] == 0
        assert stats["last_outage"]["cause"] == "database or disk is full" and not stats["write_failing"]
        ids = sorted(int(r["request_id"][4:]) for r in await fetch_requests(store, limit=1000))
        assert ids == list(range(300))
    finally:
        await store.close()


async def test_an_insert_error_costs_only_the_record_that_causes_it(store: RecordingStore) -> None:
    """A record only the INSERT can refuse (NOT NULL) fails its batch; the writer retries the batch row by
    row, so every other record is written and the bad one becomes an internal error row."""
    async with Writer(store, batch_rows=100, flush_interval_s=0.05) as writer:
        for i in range(10):
            writer.submit(dataclasses.replace(rec(i), request_id=None) if i == 4 else rec(i))
    ids = sorted(r["request_id"] for r in await fetch_requests(store.inner))
    assert ids == sorted(f"req-{i}" for i in range(10) if i != 4)
    (err,) = await fetch_errors(store.inner)
    assert err["error_type"] == "internal" and "IntegrityError" in err["error_message"]
    assert writer.rejected == 1 and writer.lost == 0 and writer.written == 10


async def test_run_journal_marks_a_clean_stop_and_reports_an_unclean_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from storage.journal import RunJournal, journal_path

    caplog.set_level(logging.WARNING, logger="storage.journal")
    store = SQLiteStore(tmp_path / "j.db")
    await store.open()
    path = journal_path(store.path)
    assert path.name == "j.db.run.json"
    in_flight = 3
    try:
        # First run: nothing before it; while running the file says not clean, with live figures.
        writer = Writer(store, flush_interval_s=5.0, journal=RunJournal(path), in_flight=lambda: in_flight)
        await writer.start()
        assert writer.previous_run is None
        for i in range(7):
            writer.submit(rec(i))
        await eventually(lambda: _journal_says(path, queued=7, in_flight=3))
        snap = json.loads(path.read_text())
        assert snap["pid"] == os.getpid() and snap["clean_shutdown"] is False
        await writer.stop()
        snap = json.loads(path.read_text())
        assert snap["clean_shutdown"] is True and snap["queued"] == 0 and snap["written"] == 7
        # A clean previous run: no warning.
        second = Writer(store, journal=RunJournal(path))
        await second.start()
        assert second.previous_run is not None and second.previous_run["clean_shutdown"] is True
        # A run that died leaves its last unclean snapshot: write one as a killed process would.
        second.submit(rec(100))
        second.submit(rec(101))
        await eventually(lambda: _journal_says(path, queued=0, in_flight=0, written=2))
        await second.stop()
        died = {**json.loads(path.read_text()), "clean_shutdown": False, "queued": 5, "in_flight": 2}
        path.write_text(json.dumps(died))
        third = Writer(store, journal=RunJournal(path))
        await third.start()
        await third.stop()
    finally:
        await store.close()
    assert third.previous_run == died
    (warning,) = [r.getMessage() for r in caplog.records if "did not shut down cleanly" in r.getMessage()]
    assert f"pid {os.getpid()}" in warning and "about 5 finished records" in warning
    assert "2 requests were in flight" in warning


async def _journal_says(path: Path, **expected: int) -> bool:
    try:
        snap = json.loads(await asyncio.to_thread(path.read_text))
    except (OSError, ValueError):
        return False
    return all(snap.get(k) == v for k, v in expected.items())
