"""Retention on PostgreSQL: drop whole day partitions of the raw tables, delete only the leftovers.

What goes is exactly what SQLite's retention (storage/retention.py) removes, with the same hour-aligned
cutoffs, so both backends keep the same rows. How differs: a raw table's days that lie wholly before the
cutoff are dropped as tables (instant, no dead rows, nothing for VACUUM); only the rows of the day holding
the cutoff (and of the default partition) are deleted, in chunks of ``batch_rows``. The rollup and usage
tables are not partitioned and are deleted in chunks as in SQLite. Every step is a write job through the
writer, so a batch waits for at most one chunk or one ``DROP TABLE``. There is no checkpoint or vacuum step:
autovacuum reclaims the few deleted rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32
import orjson

from storage.base import WriteExecutor
from storage.errors import StorageError
from storage.postgres import partitions
from storage.postgres.schema import PARTITIONED
from storage.postgres.store import PostgresStore
from storage.records import iso_utc
from storage.retention import DAY_S, RetentionPolicy, floor_hour

__all__ = ["PgRetention"]

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.policy = policy
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
        storage.retention.Retention.run_once returns, plus ``partitions_dropped``."""
        async with self._lock:
            now = self.clock() if now is None else now
            started = self.clock()
            run: dict[str, Any] = {
                "deleted": {},
                "statements": 0,
                "max_statement_ms": 0.0,
                "partitions_dropped": {},
            }
            error = None
            try:
                for table, (column, cutoff) in self.cutoffs(now).items():
                    n = 0
                    if table in PARTITIONED:
                        n += await self._drop(ex, table, cutoff, dry_run, run)
                    n += await self._leftovers(ex, table, column, cutoff, dry_run, run)
                    run["deleted"][table] = n
            except StorageError as exc:
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
                "statements": run["statements"],
                "max_statement_ms": round(run["max_statement_ms"], 3),
                "error": error,
            }
            if not dry_run:
                await self._record(ex, result)
            self.last_run = result
            return result

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
        """Run after ``first_run_s``, then every ``interval_s``, until cancelled."""
        await asyncio.sleep(min(self.first_run_s, self.interval_s))
        while True:
            try:
                result = await self.run_once(executor)
                logger.info("retention: deleted %s", result["deleted"])
            except StorageError as exc:  # the writer stopping under us, or the store down: next time
                logger.warning("retention: %s", exc)
            await asyncio.sleep(self.interval_s)
