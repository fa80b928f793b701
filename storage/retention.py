"""Retention: delete old rows in small timed batches, give the space back, keep the WAL bounded.

Why it looks like this: the writer must never wait long. Every delete is one short autocommit ``DELETE``
sent through the *writer's own* aiosqlite connection, which runs its calls one at a time: a batch delete
therefore runs between two of the writer's statements, never beside it, and there is no lock to wait for
and no busy-handler sleep. (Vacuum steps need a connection of their own: see ``_vacuum_steps``.) Batches are sized to take about
``target_ms`` (20 ms; halved or grown after each one, never above ``batch_rows``), so the writer is delayed
by at most one such statement. The CLI (``ollamon db prune``) uses the same code on its own connection,
where the writer of a running proxy waits for at most one batch through its busy timeout.

What goes (cutoffs are aligned to the hour, so rollups of kept hours stay equal to their raw rows):

* ``inference_metrics``, ``error_metrics``, ``request_text`` and ``rollup_minute`` older than ``raw_days``;
* ``system_metrics`` and ``gpu_metrics`` (when present) older than ``system_days``;
* ``rollup_hour`` older than ``rollup_days``.

Space: with ``auto_vacuum=INCREMENTAL`` freed pages are returned in small ``incremental_vacuum`` steps. A
database created without it is converted once with ``VACUUM`` when it is small (``convert_max_bytes``); a
bigger one keeps reusing its free pages and the run's result says so. The WAL is checkpointed with
``TRUNCATE`` on a separate connection that never waits (``busy_timeout=0``): when readers or the writer are
busy it degrades to a passive checkpoint and is tried again on the next schedule.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from storage.records import iso_utc

__all__ = ["AioExecutor", "Retention", "RetentionPolicy", "checkpoint"]

logger = logging.getLogger(__name__)

DAY_S = 86400
_LEVELS = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    raw_days: float = 30
    system_days: float = 7
    rollup_days: float = 400
    batch_rows: int = 2000


class AioExecutor:
    """Runs retention's statements on an aiosqlite connection (the writer's, or the CLI's own)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.db.execute(sql, params) as cur:
            return int(cur.rowcount)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self.db.execute_fetchall(sql, params))


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


def checkpoint(path: Path | str) -> tuple[int, int, int] | None:
    """``wal_checkpoint(TRUNCATE)`` on a fresh connection that never waits; (busy, log, checkpointed)."""
    try:
        conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error as exc:
        logger.warning("%s: cannot open for a checkpoint: %s", path, exc)
        return None
    try:
        conn.execute("PRAGMA busy_timeout=0")
        # PASSIVE first: it copies the frames without blocking the writer, so TRUNCATE, which does block
        # new writes while it runs, only has the file truncation left to do.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])
    except sqlite3.Error as exc:
        logger.info("%s: checkpoint skipped (%s); retried on the next schedule", path, exc)
        return None
    finally:
        conn.close()


class Retention:
    """One retention pass at a time over ``executor``; ``last_run`` keeps the latest result."""

    def __init__(
        self,
        policy: RetentionPolicy,
        executor: AioExecutor,
        path: Path | str,
        *,
        target_ms: float = 20.0,
        pause_s: float = 0.005,
        convert_max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.ex = executor
        self.path = Path(path)
        self.target_ms = target_ms
        self.pause_s = pause_s
        self.convert_max_bytes = convert_max_bytes
        self.clock = clock
        self.last_run: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._cp: sqlite3.Connection | None = None
        self._cp_lock = threading.Lock()

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
        ]

    async def _existing(self) -> set[str]:
        rows = await self.ex.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}

    async def _timed(self, run: _Run, sql: str, params: Sequence[Any]) -> tuple[int, float]:
        started = time.perf_counter()
        count = await self.ex.execute(sql, params)
        ms = (time.perf_counter() - started) * 1000
        run.statements += 1
        run.max_statement_ms = max(run.max_statement_ms, ms)
        # Checkpoint what this delete appended, off the writer's connection: otherwise the WAL crosses
        # SQLite's auto-checkpoint threshold inside one of the writer's commits, which then copies
        # thousands of pages while the writer waits.
        await asyncio.to_thread(self._passive_checkpoint)
        if self.pause_s:
            await asyncio.sleep(self.pause_s)  # let the writer's next statement in
        return count, ms

    def _passive_checkpoint(self) -> None:
        # The lock keeps _close_cp (run from a finally, possibly while a cancelled checkpoint still runs in
        # its thread) from closing the connection under a running statement, which crashes the process.
        with self._cp_lock:
            if self._cp is None:
                self._cp = sqlite3.connect(
                    self.path, timeout=0, isolation_level=None, check_same_thread=False
                )
                self._cp.execute("PRAGMA busy_timeout=0")
            try:
                self._cp.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                logger.debug("passive checkpoint skipped: %s", exc)

    def _close_cp(self) -> None:
        with self._cp_lock:
            if self._cp is not None:
                self._cp.close()
                self._cp = None

    def _resize(self, n: int, ms: float) -> int:
        if ms > self.target_ms:
            return max(10, int(n * self.target_ms / ms * 0.8))
        if ms < self.target_ms / 2:
            return min(self.policy.batch_rows, n * 2)
        return n

    async def _delete(self, run: _Run, t: _Target, params: Sequence[Any]) -> None:
        sql = (
            f"DELETE FROM {t.table} WHERE rowid IN (SELECT rowid FROM {t.table} WHERE {t.condition} LIMIT ?)"
        )
        n = min(self.policy.batch_rows, 100)
        while True:
            count, ms = await self._timed(run, sql, [*params, n])
            run.deleted[t.table] = run.deleted.get(t.table, 0) + count
            if count < n:
                return
            n = self._resize(n, ms)

    async def _count(self, t: _Target, params: Sequence[Any]) -> int:
        rows = await self.ex.fetchall(f"SELECT COUNT(*) FROM {t.table} WHERE {t.condition}", params)
        return int(rows[0][0])

    async def _pragma(self, name: str) -> int:
        rows = await self.ex.fetchall(f"PRAGMA {name}")
        return int(rows[0][0])

    async def ensure_incremental_vacuum(self) -> bool:
        """Switch the file to ``auto_vacuum=INCREMENTAL`` (a one-off VACUUM) if it is small enough."""
        if await self._pragma("auto_vacuum") == 2:
            return True
        size = self.path.stat().st_size if self.path.exists() else 0
        if size > self.convert_max_bytes:
            logger.warning(
                "%s: auto_vacuum is off and the file is %d MiB; freed pages are reused but not returned "
                "to the OS. Stop the proxy and run `ollamon db prune --vacuum` once to change that.",
                self.path,
                size >> 20,
            )
            return False
        try:
            await self.ex.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await self.ex.execute("VACUUM")
        except sqlite3.OperationalError as exc:  # e.g. the writer had a transaction open; next run
            logger.info("%s: switching to incremental vacuum postponed: %s", self.path, exc)
            return False
        logger.info("%s: switched to auto_vacuum=incremental", self.path)
        return True

    def _vacuum_steps(self, run: _Run) -> int:
        """Blocking: ``incremental_vacuum`` in timed steps on a connection of its own; returns pages freed.

        Its own connection because Python's ``execute`` runs this pragma for one page only (it resets a
        statement that returns no columns after one step); ``executescript`` runs it to completion, but
        would commit a transaction the writer has open on the writer's connection. Each step holds the write
        lock for about ``target_ms``; the writer waits for at most one step through its busy timeout."""
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")  # as the writer: WAL commits without an fsync each
        freed = 0
        step = 64
        try:
            while (free := int(conn.execute("PRAGMA freelist_count").fetchone()[0])) > 0:
                started = time.perf_counter()
                conn.executescript(f"PRAGMA incremental_vacuum({min(step, free)});")
                ms = (time.perf_counter() - started) * 1000
                run.statements += 1
                run.max_statement_ms = max(run.max_statement_ms, ms)
                after = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if after >= free:
                    break
                freed += free - after
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # as in _timed
                step = self._resize(step, ms) if ms > self.target_ms else min(step * 2, 4096)
                time.sleep(self.pause_s)
        finally:
            conn.close()
        return freed

    async def _vacuum(self, run: _Run) -> int:
        """Return free pages to the OS (when the file allows it); returns pages freed."""
        if not await self.ensure_incremental_vacuum():
            return 0
        return await asyncio.to_thread(self._vacuum_steps, run)

    async def run_once(self, *, dry_run: bool = False, now: float | None = None) -> dict[str, Any]:
        """Delete (or, with ``dry_run``, count) what the policy says is too old; vacuum; checkpoint."""
        async with self._lock:
            now = self.clock() if now is None else now
            started = self.clock()
            run = _Run()
            error = None
            freed_bytes = 0
            existing = await self._existing()
            try:
                for t in self.targets(now):
                    if t.table not in existing:
                        continue
                    for params in [[lv, t.cutoff] for lv in _LEVELS] if t.per_level else [[t.cutoff]]:
                        if dry_run:
                            run.deleted[t.table] = run.deleted.get(t.table, 0) + await self._count(t, params)
                        else:
                            await self._delete(run, t, params)
                if not dry_run:
                    page = await self._pragma("page_size")
                    freed_bytes = await self._vacuum(run) * page
                    await asyncio.to_thread(checkpoint, self.path)
            except sqlite3.Error as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: retention run failed: %s", self.path, error)
            finally:
                await asyncio.to_thread(self._close_cp)
            result = {
                "started_at": iso_utc(started),
                "finished_at": iso_utc(self.clock()),
                "dry_run": dry_run,
                "deleted": run.deleted,
                "freed_bytes": freed_bytes,
                "statements": run.statements,
                "max_statement_ms": round(run.max_statement_ms, 3),
                "error": error,
            }
            if not dry_run and "retention_runs" in existing:
                await self._record(result)
            self.last_run = result
            return result

    async def _record(self, r: dict[str, Any]) -> None:
        try:
            await self.ex.execute(
                "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted, freed_bytes, "
                "max_statement_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    r["started_at"],
                    r["finished_at"],
                    int(r["dry_run"]),
                    orjson.dumps(r["deleted"]).decode(),
                    r["freed_bytes"],
                    r["max_statement_ms"],
                    r["error"],
                ],
            )
        except sqlite3.Error as exc:
            logger.warning("%s: cannot record the retention run: %s", self.path, exc)

    async def loop(self, interval_s: float, checkpoint_interval_s: float, first_run_s: float = 60.0) -> None:
        """Run every ``interval_s`` (first after ``first_run_s``), checkpoint every ``checkpoint_interval_s``."""
        next_run = time.monotonic() + min(first_run_s, interval_s)
        next_cp = time.monotonic() + checkpoint_interval_s
        while True:
            now = time.monotonic()
            await asyncio.sleep(max(0.0, min(next_run, next_cp) - now))
            if time.monotonic() >= next_run:
                try:
                    result = await self.run_once()
                    logger.info("retention: deleted %s", result["deleted"])
                except (sqlite3.Error, ValueError) as exc:  # store closing under us
                    logger.warning("retention run failed: %s", exc)
                next_run = time.monotonic() + interval_s
                next_cp = time.monotonic() + checkpoint_interval_s
            elif time.monotonic() >= next_cp:
                await asyncio.to_thread(checkpoint, self.path)
                next_cp = time.monotonic() + checkpoint_interval_s
