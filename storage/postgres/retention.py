"""Retention on PostgreSQL: drop whole day partitions of the raw tables, delete only the leftovers.

What goes is exactly what SQLite's retention (storage/retention.py) removes, with the same hour-aligned
cutoffs, so both backends keep the same rows. How differs: a raw table's days that lie wholly before the
cutoff are dropped as tables (instant, no dead rows, nothing for VACUUM); only the rows of the day holding
the cutoff (and of the default partition) are deleted, in chunks of ``batch_rows``. The rollup and usage
tables are not partitioned and are deleted in chunks as in SQLite. Every step is a write job through the
writer, so a batch waits for at most one chunk or one ``DROP TABLE``. There is no checkpoint or vacuum step:
autovacuum reclaims the few deleted rows.

Several instances share one database: a pass runs only on the holder of the ``maintenance`` lease
(storage/lease.py); the others skip theirs and say so in ``last_run``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32
import orjson

from storage import rollup_day
from storage.base import WriteExecutor
from storage.errors import StorageError
from storage.lease import Lease
from storage.postgres import partitions
from storage.postgres.schema import PARTITIONED
from storage.postgres.store import PostgresStore
from storage.postgres.sync_conn import PgReadError, PgSource
from storage.records import iso_utc
from storage.retention import DAY_S, RetentionPolicy, floor_hour

__all__ = ["PgRetention"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PgRetention:
    """One retention pass at a time through a writer (``Maintenance``); ``last_run`` keeps the latest."""

    def __init__(
        self,
        policy: RetentionPolicy,
        store: PostgresStore | None = None,
        *,
        interval_s: float = 3600.0,
        first_run_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        lease: Lease | None = None,
    ) -> None:
        self.policy = policy
        self.lease = lease  # None: this instance is alone, every pass runs
        self.store = store  # told to reload its partition list after a drop
        self.interval_s = interval_s
        self.first_run_s = first_run_s
        self.clock = clock
        self.last_run: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    def cutoffs(self, now: float) -> dict[str, tuple[str, Any]]:
        """``{table: (column, cutoff)}``: rows with ``column < cutoff`` go (SQLite's targets, same values)."""
        p = self.policy
        raw_cut = floor_hour(now - p.raw_days * DAY_S)
        raw_iso = iso_utc(raw_cut)
        system_iso = iso_utc(now - p.system_days * DAY_S)
        rollup_cut = floor_hour(now - p.rollup_days * DAY_S)
        return {
            "inference_metrics": ("timestamp", raw_iso),
            "error_metrics": ("timestamp", raw_iso),
            "request_text": ("timestamp", raw_iso),
            "rollup_minute": ("bucket", raw_cut),
            "system_metrics": ("timestamp", system_iso),
            "gpu_metrics": ("timestamp", system_iso),
            "rollup_hour": ("bucket", rollup_cut),
            "usage_hour": ("bucket", rollup_cut),
        }

    async def _leftovers(
        self, ex: WriteExecutor, table: str, column: str, cutoff: Any, dry_run: bool, run: dict[str, Any]
    ) -> int:
        """Delete (or count) the rows of ``table`` before ``cutoff`` that no dropped partition took."""
        if dry_run:
            sql = f"SELECT count(*) FROM {table} WHERE {column} < $1"
            return int(await ex.execute_write(lambda c: c.fetchval(sql, cutoff), transaction=False))
        # tableoid + ctid name a row of a partitioned table; partition pruning reads only the old days.
        sql = (
            f"DELETE FROM {table} WHERE (tableoid, ctid) IN "
            f"(SELECT tableoid, ctid FROM {table} WHERE {column} < $1 LIMIT $2)"
        )
        total = 0
        while True:

            async def chunk(conn: asyncpg.Connection) -> tuple[int, float]:
                started = time.perf_counter()
                status = await conn.execute(sql, cutoff, self.policy.batch_rows)
                return int(status.split()[-1]), (time.perf_counter() - started) * 1000

            count, ms = await ex.execute_write(chunk)
            total += count
            run["statements"] += 1
            run["max_statement_ms"] = max(run["max_statement_ms"], ms)
            if count < self.policy.batch_rows:
                return total

    async def _drop(
        self, ex: WriteExecutor, table: str, cutoff: str, dry_run: bool, run: dict[str, Any]
    ) -> int:
        """Drop ``table``'s partitions wholly before ``cutoff``, one write job each; returns the rows they
        held. A dry run only counts the partitions (``_leftovers`` counts every row then)."""
        rows = 0
        days = await ex.execute_write(lambda c: partitions.existing_days(c, table), transaction=False)
        for day in sorted(d for d in days if partitions.next_day(d) <= cutoff):
            if not dry_run:

                async def drop(conn: asyncpg.Connection, day: str = day) -> int:
                    return await partitions.drop_day(conn, table, day)

                rows += await ex.execute_write(drop)
                run["statements"] += 1
            run["partitions_dropped"][table] = run["partitions_dropped"].get(table, 0) + 1
        return rows

    async def run_once(
        self, ex: WriteExecutor, *, dry_run: bool = False, now: float | None = None
    ) -> dict[str, Any]:
        """Drop or delete (with ``dry_run``, count) what the policy says is too old; returns what
        storage.retention.Retention.run_once returns, plus ``partitions_dropped``. Outside ``loop()`` (a
        one-off pass) the maintenance lease is taken for this pass only, so it never runs beside the
        fleet's holder."""
        lease = self.lease
        if dry_run or lease is None or lease.started:
            return await self._run_once(ex, dry_run, now)
        await lease.start()
        try:
            return await self._run_once(ex, dry_run, now)
        finally:
            await lease.stop()

    async def _run_once(self, ex: WriteExecutor, dry_run: bool, now: float | None) -> dict[str, Any]:
        async with self._lock:
            now = self.clock() if now is None else now
            started = self.clock()
            if not dry_run and self.lease is not None and not self.lease.held:
                self.last_run = self._skipped(started)
                return self.last_run
            run: dict[str, Any] = {
                "deleted": {},
                "statements": 0,
                "max_statement_ms": 0.0,
                "partitions_dropped": {},
            }
            error = None
            compacted = 0
            try:
                for table, (column, cutoff) in self.cutoffs(now).items():
                    n = 0
                    if table in PARTITIONED:
                        n += await self._drop(ex, table, cutoff, dry_run, run)
                    n += await self._leftovers(ex, table, column, cutoff, dry_run, run)
                    run["deleted"][table] = n
                if not dry_run and self.store is not None:
                    # after the deletes, so a day that lost hours is rebuilt from what is left (as SQLite's)
                    read = _reader(self.store.url)
                    compacted = await rollup_day.compact(ex, read, now)
                    await rollup_day.compact_recent(ex, read, now)
            except (StorageError, PgReadError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("retention run failed: %s", error)
            finally:
                if run["partitions_dropped"] and not dry_run and self.store is not None:
                    self.store.forget_days()
            result = {
                "started_at": iso_utc(started),
                "finished_at": iso_utc(self.clock()),
                "dry_run": dry_run,
                "deleted": run["deleted"],
                "partitions_dropped": run["partitions_dropped"],
                "freed_bytes": 0,
                "rollup_days_compacted": compacted,
                "statements": run["statements"],
                "max_statement_ms": round(run["max_statement_ms"], 3),
                "error": error,
            }
            if not dry_run:
                await self._record(ex, result)
            self.last_run = result
            return result

    def _skipped(self, at: float) -> dict[str, Any]:
        assert self.lease is not None
        holder = self.lease.snapshot().get("holder")
        logger.info("retention: skipped, the maintenance lease is held by %s", holder)
        return {
            "started_at": iso_utc(at), "finished_at": iso_utc(at), "dry_run": False, "deleted": {},
            "partitions_dropped": {}, "freed_bytes": 0, "statements": 0, "max_statement_ms": 0.0,
            "error": None, "skipped": f"another instance ({holder or 'none yet'}) holds the maintenance lease",
        }  # fmt: skip

    async def _record(self, ex: WriteExecutor, r: dict[str, Any]) -> None:
        values = (
            r["started_at"], r["finished_at"], int(r["dry_run"]), orjson.dumps(r["deleted"]).decode(),
            r["freed_bytes"], float(r["max_statement_ms"]), r["error"],
        )  # fmt: skip

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted, freed_bytes, "
                "max_statement_ms, error) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                *values,
            )

        try:
            await ex.execute_write(insert)
        except StorageError as exc:
            logger.warning("cannot record the retention run: %s", exc)

    async def loop(self, executor: WriteExecutor) -> None:
        """Run after ``first_run_s``, then every ``interval_s``, until cancelled; holds the maintenance
        lease (when given) meanwhile and releases it when cancelled."""
        if self.lease is not None:
            await self.lease.start()
        try:
            await asyncio.sleep(min(self.first_run_s, self.interval_s))
            while True:
                try:
                    result = await self.run_once(executor)
                    if not result.get("skipped"):
                        logger.info("retention: deleted %s", result["deleted"])
                except StorageError as exc:  # the writer stopping under us, or the store down: next time
                    logger.warning("retention: %s", exc)
                await asyncio.sleep(self.interval_s)
        finally:
            if self.lease is not None:
                await self.lease.stop()


def _reader(url: str) -> rollup_day.Reader:
    """Compaction's reads, on a pooled connection of the synchronous read path (storage/postgres/sync_conn.py)."""

    def read(fn: Callable[[Any], T]) -> T:
        with PgSource.for_url(url).connection() as conn:
            return fn(conn)

    return read
