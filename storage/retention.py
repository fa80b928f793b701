"""Retention: delete old rows in small timed chunks, give the space back, keep the WAL bounded.

Why it looks like this: the writer must never wait long, and nothing but the writer writes. Every step is
a write job (``Writer.execute_write``): each chunk delete is one ``DELETE ... LIMIT n`` in a transaction
of its own, run by the writer task between two record batches, and counted only once the job returned,
i.e. once it committed. So a delete can never land inside a batch's transaction, and every row counted
as deleted really is (the race the old design had, when retention shared the writer's connection from
another task). Chunks are sized to take about ``target_ms`` (20 ms; halved or grown after each one, never
above ``batch_rows``), so a batch waits for at most one of them. ``ollamon db prune`` runs the same code
through a writer of its own (``prune``); a running proxy's writer waits for at most one chunk through
its busy timeout.

What goes (cutoffs are aligned to the hour, so rollups of kept hours stay equal to their raw rows):

* ``inference_metrics``, ``error_metrics``, ``request_text`` and ``rollup_minute`` older than ``raw_days``;
* ``system_metrics`` and ``gpu_metrics`` (when present) older than ``system_days``;
* ``rollup_hour`` older than ``rollup_days``.

Then the daily rollups are brought up to date with the hourly ones (storage/rollup_day.py): days that
finished since the last run, days that got late writes, and days retention took hours from (a day left
without hours loses its day rows), so ``rollup_day`` follows ``rollup_days`` through ``rollup_hour``; and the
5-minute rows of the last two days (``rollup_5m``) with ``rollup_minute`` the same way.

Space: with ``auto_vacuum=INCREMENTAL`` freed pages are returned in small ``incremental_vacuum`` steps
(each a job). A database created without it is converted once with ``VACUUM`` when it is small
(``convert_max_bytes``); a bigger one keeps reusing its free pages and the run's result says so. After
each delete the WAL gets a passive checkpoint, so SQLite's auto-checkpoint never copies thousands of pages
inside a batch's commit; after a run (and every ``checkpoint_interval_s``) a ``TRUNCATE`` checkpoint that
never waits (``busy_timeout=0`` for that job): when readers are busy it degrades to a passive checkpoint
and is tried again on the next schedule.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from storage import rollup_day
from storage.base import WriteExecutor
from storage.errors import StorageError
from storage.records import iso_utc

__all__ = ["Retention", "RetentionPolicy", "checkpoint"]

logger = logging.getLogger(__name__)

DAY_S = 86400
_LEVELS = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    raw_days: float = 30
    system_days: float = 7
    rollup_days: float = 400
    batch_rows: int = 2000


@dataclass(slots=True)
class _Target:
    table: str
    condition: str  # with one ? for the cutoff (and one for the level when per_level)
    cutoff: Any
    per_level: bool = False


@dataclass(slots=True)
class _Run:
    deleted: dict[str, int] = field(default_factory=dict)
    statements: int = 0
    max_statement_ms: float = 0.0


def floor_hour(epoch_s: float) -> int:
    return int(epoch_s // 3600) * 3600


async def _one(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    async with db.execute(sql, params) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def _checkpoint_job(db: aiosqlite.Connection) -> tuple[int, int, int] | None:
    """``wal_checkpoint(TRUNCATE)`` that never waits for readers: busy_timeout 0 for this job only."""
    before = int(await _one(db, "PRAGMA busy_timeout"))
    await db.execute("PRAGMA busy_timeout=0")
    try:
        # PASSIVE first: it copies the frames, so TRUNCATE only has the file truncation left to do.
        await _one(db, "PRAGMA wal_checkpoint(PASSIVE)")
        async with db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))
    except sqlite3.Error as exc:
        logger.info("checkpoint skipped (%s); retried on the next schedule", exc)
        return None
    finally:
        await db.execute(f"PRAGMA busy_timeout={before}")


async def checkpoint(executor: WriteExecutor) -> tuple[int, int, int] | None:
    """A ``TRUNCATE`` checkpoint run by the writer; (busy, log, checkpointed) or None when skipped."""
    result: tuple[int, int, int] | None = await executor.execute_write(_checkpoint_job, transaction=False)
    return result


async def _passive_checkpoint(db: aiosqlite.Connection) -> None:
    try:
        await _one(db, "PRAGMA wal_checkpoint(PASSIVE)")
    except sqlite3.Error as exc:
        logger.debug("passive checkpoint skipped: %s", exc)


class Retention:
    """One retention pass at a time, through a writer; ``loop()`` is the proxy's schedule (``Maintenance``).

    ``last_run`` keeps the latest result."""

    def __init__(
        self,
        policy: RetentionPolicy,
        path: Path | str,
        *,
        interval_s: float = 3600.0,
        checkpoint_interval_s: float = 300.0,
        first_run_s: float = 60.0,
        target_ms: float = 20.0,
        pause_s: float = 0.005,
        convert_max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.path = Path(path)
        self.interval_s = interval_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.first_run_s = first_run_s
        self.target_ms = target_ms
        self.pause_s = pause_s
        self.convert_max_bytes = convert_max_bytes
        self.clock = clock
        self.last_run: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    def targets(self, now: float) -> list[_Target]:
        p = self.policy
        raw_cut = floor_hour(now - p.raw_days * DAY_S)
        raw_iso = iso_utc(raw_cut)
        return [
            _Target("inference_metrics", "timestamp < ?", raw_iso),
            _Target("error_metrics", "timestamp < ?", raw_iso),
            _Target("request_text", "timestamp < ?", raw_iso),
            _Target("rollup_minute", "level = ? AND bucket < ?", raw_cut, per_level=True),
            _Target("system_metrics", "timestamp < ?", iso_utc(now - p.system_days * DAY_S)),
            _Target("gpu_metrics", "timestamp < ?", iso_utc(now - p.system_days * DAY_S)),
            _Target(
                "rollup_hour",
                "level = ? AND bucket < ?",
                floor_hour(now - p.rollup_days * DAY_S),
                per_level=True,
            ),
            # Usage per key, team, model and user (m009) is kept as long as the rollups.
            _Target("usage_hour", "bucket < ?", floor_hour(now - p.rollup_days * DAY_S)),
        ]

    @staticmethod
    async def _existing(db: aiosqlite.Connection) -> set[str]:
        rows = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}

    def _resize(self, n: int, ms: float) -> int:
        if ms > self.target_ms:
            return max(10, int(n * self.target_ms / ms * 0.8))
        if ms < self.target_ms / 2:
            return min(self.policy.batch_rows, n * 2)
        return n

    async def _delete(self, ex: WriteExecutor, run: _Run, t: _Target, params: Sequence[Any]) -> None:
        sql = (
            f"DELETE FROM {t.table} WHERE rowid IN (SELECT rowid FROM {t.table} WHERE {t.condition} LIMIT ?)"
        )
        n = min(self.policy.batch_rows, 100)
        while True:

            async def chunk(db: aiosqlite.Connection, limit: int = n) -> tuple[int, float]:
                started = time.perf_counter()
                async with db.execute(sql, [*params, limit]) as cur:
                    count = int(cur.rowcount)
                return count, (time.perf_counter() - started) * 1000

            count, ms = await ex.execute_write(chunk)  # returned = committed: only now is it counted
            run.deleted[t.table] = run.deleted.get(t.table, 0) + count
            run.statements += 1
            run.max_statement_ms = max(run.max_statement_ms, ms)
            # What this delete appended goes to the database file now, in a step of its own: otherwise the
            # WAL crosses SQLite's auto-checkpoint threshold inside a batch's commit, which then copies
            # thousands of pages while the batch waits.
            await ex.execute_write(_passive_checkpoint, transaction=False)
            if count < n:
                return
            n = self._resize(n, ms)
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def _count(self, ex: WriteExecutor, t: _Target, params: Sequence[Any]) -> int:
        sql = f"SELECT COUNT(*) FROM {t.table} WHERE {t.condition}"
        return int(await ex.execute_write(lambda db: _one(db, sql, params), transaction=False))

    async def ensure_incremental_vacuum(self, ex: WriteExecutor) -> bool:
        """Switch the file to ``auto_vacuum=INCREMENTAL`` (a one-off VACUUM) if it is small enough."""

        async def convert(db: aiosqlite.Connection) -> bool | None:
            if int(await _one(db, "PRAGMA auto_vacuum")) == 2:
                return True
            size = self.path.stat().st_size if self.path.exists() else 0
            if size > self.convert_max_bytes:
                return None
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await db.execute("VACUUM")
            return False

        try:
            done = await ex.execute_write(convert, transaction=False)
        except StorageError as exc:
            logger.info("%s: switching to incremental vacuum postponed: %s", self.path, exc)
            return False
        if done is None:
            size = self.path.stat().st_size if self.path.exists() else 0
            logger.warning(
                "%s: auto_vacuum is off and the file is %d MiB; freed pages are reused but not returned "
                "to the OS. Stop the proxy and run `ollamon db prune --vacuum` once to change that.",
                self.path,
                size >> 20,
            )
            return False
        if not done:
            logger.info("%s: switched to auto_vacuum=incremental", self.path)
        return True

    async def _vacuum(self, ex: WriteExecutor, run: _Run) -> int:
        """Return free pages to the OS in timed ``incremental_vacuum`` steps, each a job; pages freed.

        ``executescript``, because ``execute`` runs this pragma for one page only (it resets a statement
        that returns no columns after one step); between jobs the writer's connection has no transaction
        open that executescript's implicit COMMIT could end."""
        if not await self.ensure_incremental_vacuum(ex):
            return 0
        freed = 0
        step = 64
        while True:

            async def vacuum_step(db: aiosqlite.Connection, step: int = step) -> tuple[int, int, float]:
                free = int(await _one(db, "PRAGMA freelist_count"))
                if free == 0:
                    return 0, 0, 0.0
                started = time.perf_counter()
                await db.executescript(f"PRAGMA incremental_vacuum({min(step, free)});")
                ms = (time.perf_counter() - started) * 1000
                after = int(await _one(db, "PRAGMA freelist_count"))
                await _passive_checkpoint(db)
                return free, after, ms

            free, after, ms = await ex.execute_write(vacuum_step, transaction=False)
            if free == 0:
                return freed
            run.statements += 1
            run.max_statement_ms = max(run.max_statement_ms, ms)
            if after >= free:
                return freed
            freed += free - after
            step = self._resize(step, ms) if ms > self.target_ms else min(step * 2, 4096)
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def run_once(
        self, ex: WriteExecutor, *, dry_run: bool = False, now: float | None = None
    ) -> dict[str, Any]:
        """Delete (or, with ``dry_run``, count) what the policy says is too old; vacuum; checkpoint.

        Everything runs through ``ex`` (the writer)."""
        async with self._lock:
            now = self.clock() if now is None else now
            started = self.clock()
            run = _Run()
            error = None
            freed_bytes = 0
            compacted = 0
            existing: set[str] = set()
            try:
                existing = await ex.execute_write(self._existing, transaction=False)
                for t in self.targets(now):
                    if t.table not in existing:
                        continue
                    for params in [[lv, t.cutoff] for lv in _LEVELS] if t.per_level else [[t.cutoff]]:
                        if dry_run:
                            run.deleted[t.table] = run.deleted.get(t.table, 0) + await self._count(
                                ex, t, params
                            )
                        else:
                            await self._delete(ex, run, t, params)
                if not dry_run:
                    # after the deletes, so a day that lost hours is rebuilt from what is left
                    compacted = await rollup_day.compact(ex, self.path, now)
                    await rollup_day.compact_recent(ex, self.path, now)
                    page = int(
                        await ex.execute_write(lambda db: _one(db, "PRAGMA page_size"), transaction=False)
                    )
                    freed_bytes = await self._vacuum(ex, run) * page
                    await checkpoint(ex)
            except (StorageError, sqlite3.Error) as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: retention run failed: %s", self.path, error)
            result = {
                "started_at": iso_utc(started),
                "finished_at": iso_utc(self.clock()),
                "dry_run": dry_run,
                "deleted": run.deleted,
                "freed_bytes": freed_bytes,
                "rollup_days_compacted": compacted,
                "statements": run.statements,
                "max_statement_ms": round(run.max_statement_ms, 3),
                "error": error,
            }
            if not dry_run and "retention_runs" in existing:
                await self._record(ex, result)
            self.last_run = result
            return result

    async def _record(self, ex: WriteExecutor, r: dict[str, Any]) -> None:
        values = [
            r["started_at"],
            r["finished_at"],
            int(r["dry_run"]),
            orjson.dumps(r["deleted"]).decode(),
            r["freed_bytes"],
            r["max_statement_ms"],
            r["error"],
        ]

        async def insert(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted, freed_bytes, "
                "max_statement_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )

        try:
            await ex.execute_write(insert)
        except StorageError as exc:
            logger.warning("%s: cannot record the retention run: %s", self.path, exc)

    async def loop(self, executor: WriteExecutor) -> None:
        """Convert a small file to incremental vacuum now, then run every ``interval_s`` (first after
        ``first_run_s``) and checkpoint every ``checkpoint_interval_s``; until cancelled."""
        await self.ensure_incremental_vacuum(executor)
        start = time.monotonic()
        next_run = start + min(self.first_run_s, self.interval_s)
        next_cp = start + self.checkpoint_interval_s
        while True:
            await asyncio.sleep(max(0.0, min(next_run, next_cp) - time.monotonic()))
            try:
                if time.monotonic() >= next_run:
                    result = await self.run_once(executor)
                    logger.info("retention: deleted %s", result["deleted"])
                    next_run = time.monotonic() + self.interval_s
                    next_cp = time.monotonic() + self.checkpoint_interval_s
                elif time.monotonic() >= next_cp:
                    await checkpoint(executor)
                    next_cp = time.monotonic() + self.checkpoint_interval_s
            except StorageError as exc:  # the writer stopping under us, or the store down: next time
                logger.warning("retention: %s", exc)
                next_run = max(next_run, time.monotonic() + min(60.0, self.interval_s))
                next_cp = time.monotonic() + self.checkpoint_interval_s
