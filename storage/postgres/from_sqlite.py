"""Copy an ollamon SQLite database into a PostgreSQL one (``ollamon db migrate``), resumable, merging rollups.

Why: a team moving from one proxy on SQLite to several on PostgreSQL keeps its history. The target may
already be written by live instances, so nothing here may double count or collide with what they write:

* **Raw, append-only tables** (inference, errors, text, samples, model events, retention runs, alert
  transitions) are copied in chunks in SQLite rowid order with binary ``COPY``, the day partitions a chunk
  needs created first. Their ``id`` is NOT kept: PostgreSQL assigns it (identity columns), since ids the
  live instances already hold would collide. Nothing refers to these ids except ``alert_transitions.alert_id``.
* **Alerts** get new ids too; ``_migrate_ids`` keeps SQLite's id -> PostgreSQL's, so transitions point at
  the right alert and a re-run updates the alert (its state may have moved on) instead of adding it twice.
* **Keyed tables** are upserted: ``model_info`` (the newer ``updated_at`` wins, the earlier ``first_seen``
  stays), ``api_keys`` (a key already there keeps its settings; a revocation on either side sticks),
  ``content_analysis`` (the newer ``analyzed_at`` wins).
* **Rollups** (``rollup_minute``, ``rollup_hour``, ``usage_hour``) are MERGED as PgRollupHook merges a
  batch: counts and sums added, histograms merged, under the same advisory lock. ``rollup_day`` and
  ``rollup_5m`` are not copied: they are derived from the hours and minutes (and left empty on PostgreSQL,
  where readers then read the hours, storage/rollup_day.py).

**Resumable**: ``_migrate_progress`` (created here, outside the schema migrations) holds per source and
table the last SQLite rowid copied and the rows so far, updated in the same transaction as each chunk, so a
migration killed at any point continues where it stopped, no row twice and none missing. The source is the
SQLite file's creation (``m001_initial``'s ``applied_at``), which neither retention nor a move changes: a
copy of the same file counts as the same source. The small keyed tables and alerts are copied whole on every
run (idempotent). The SQLite file is opened read-only; a proxy may still be writing it (WAL): a re-run then
copies what was appended since, but rollup rows of the minute or hour still being written are copied as
they were, so stop the proxy (or point it at PostgreSQL) before the last run.

This module plans and reads; storage/postgres/from_sqlite_write.py writes each kind of table.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.migrations import MIGRATIONS as SQLITE_MIGRATIONS
from storage.postgres.errors import PgOpenError, redact
from storage.postgres.from_sqlite_write import (
    PROGRESS_DDL,
    Copier,
    Kind,
    MigrateError,
    Table,
    pg_columns,
    plan_table,
)
from storage.postgres.store import PostgresStore

__all__ = ["PLANS", "SKIPPED", "MigrateError", "Progress", "TableState", "migrate", "source_of"]

# Copy order: alerts before their transitions; everything else independent.
PLANS: dict[str, Kind] = {
    "inference_metrics": "append",
    "error_metrics": "append",
    "request_text": "text",
    "system_metrics": "append",
    "gpu_metrics": "append",
    "model_events": "append",
    "retention_runs": "append",
    "model_info": "keyed",
    "api_keys": "keyed",
    "content_analysis": "content",
    "alerts": "alerts",
    "alert_transitions": "transitions",
    "rollup_minute": "rollup",
    "rollup_hour": "rollup",
    "usage_hour": "usage",
}
SKIPPED = frozenset({"_migrations", "sqlite_sequence", "rollup_day", "rollup_5m"})  # bookkeeping or derived
_WHOLE: frozenset[Kind] = frozenset({"keyed", "alerts"})  # small and updated in place: copied whole each run


@dataclass
class TableState:
    """One table's progress: ``done`` rows of ``total`` (previous runs included), for the progress bar."""

    table: str
    total: int
    done: int = 0
    copied: int = 0  # by this run
    started: float = field(default_factory=time.monotonic)
    finished: bool = False


@dataclass
class Progress:
    """The whole migration's outcome: per table state, whether it stopped early, the rows copied."""

    source: str
    tables: dict[str, TableState] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def copied(self) -> int:
        return sum(t.copied for t in self.tables.values())


def _connect_ro(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise MigrateError(f"--from: no SQLite file at {str(path)!r}", bad_input=True)
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError):  # locked, unreadable: a file we may not read now
            raise MigrateError(f"--from: cannot read {str(path)!r}: {exc}", bad_input=True) from exc
        raise MigrateError(f"--from: {str(path)!r} is not a SQLite database ({exc})", bad_input=True) from exc
    if "_migrations" not in tables or "inference_metrics" not in tables:
        conn.close()
        raise MigrateError(
            f"--from: {str(path)!r} is a SQLite database but not ollamon's (no _migrations)", bad_input=True
        )
    return conn


def source_of(conn: sqlite3.Connection) -> str:
    """The source's identity: when its schema was created (``m001_initial``), stable for the file's life."""
    row = conn.execute("SELECT applied_at FROM _migrations WHERE name = 'm001_initial'").fetchone()
    if row is None:
        raise MigrateError(
            "--from: the file's _migrations has no m001_initial: not an ollamon database", bad_input=True
        )
    return f"sqlite:{row[0]}"


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    applied = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    missing = [m.__name__ for m in SQLITE_MIGRATIONS if m.__name__ not in applied]
    if missing:
        raise MigrateError(
            f"--from: {str(path)!r} is behind this ollamon's schema (missing {', '.join(missing)}); let this "
            f"version open it once (`ollamon db prune --dry-run --db {path}` does), then migrate",
            bad_input=True,
        )


def _read(conn: sqlite3.Connection, t: Table, after: int, limit: int) -> list[tuple[Any, ...]]:
    """Rows after ``after`` in rowid order, each as ``(rowid, *columns)``; alerts keep their id last."""
    tail = ", id" if t.kind == "alerts" else ""
    sql = f"SELECT rowid, {', '.join(t.columns)}{tail} FROM {t.name} WHERE rowid > ? ORDER BY rowid LIMIT ?"
    return conn.execute(sql, (after, limit)).fetchall()


async def _progress(conn: asyncpg.Connection, source: str) -> dict[str, tuple[int, int]]:
    if await conn.fetchval("SELECT to_regclass('_migrate_progress')") is None:
        return {}
    rows = await conn.fetch("SELECT tbl, last_rowid, rows FROM _migrate_progress WHERE source = $1", source)
    return {r[0]: (r[1], r[2]) for r in rows}


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=10.0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise PgOpenError(redact(url), f"{type(exc).__name__}: {exc}") from exc


async def migrate(
    path: Path | str,
    url: str,
    *,
    chunk: int = 5000,
    dry_run: bool = False,
    on_chunk: Callable[[TableState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Progress:
    """Copy the SQLite database at ``path`` into the PostgreSQL one at ``url`` (see the module docstring).

    ``on_chunk`` sees a table's state after each committed chunk (and once at a table's start and end);
    ``should_stop`` is asked after each chunk: True stops there (``Progress.stopped``), resumable. With
    ``dry_run`` only the rows to copy are counted; the target is not written (nor migrated)."""
    if chunk < 1:
        raise MigrateError(f"--chunk must be at least 1, not {chunk}", bad_input=True)
    path = Path(path)
    lite = await asyncio.to_thread(_connect_ro, path)
    try:
        source = await asyncio.to_thread(source_of, lite)
        await asyncio.to_thread(_check_version, lite, path)
        if not dry_run:
            store = PostgresStore(url)  # migrates the target and creates the coming days' partitions
            await store.open()
            await store.close()
        conn = await _connect(url)
        try:
            return await _run(lite, conn, path, source, chunk, dry_run, on_chunk, should_stop)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise MigrateError(f"{redact(url)}: {type(exc).__name__}: {exc}") from exc
        finally:
            await conn.close()
    finally:
        lite.close()


async def _run(
    lite: sqlite3.Connection,
    conn: asyncpg.Connection,
    path: Path,
    source: str,
    chunk: int,
    dry_run: bool,
    on_chunk: Callable[[TableState], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Progress:
    lite_tables = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    result = Progress(source, skipped=sorted(lite_tables - PLANS.keys() - SKIPPED))
    if not dry_run:
        for ddl in PROGRESS_DDL:
            await conn.execute(ddl)
        # One migration of a source at a time: two would both copy what neither has recorded yet.
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", source):
            raise MigrateError(
                f"another `ollamon db migrate` of this file ({source}) is running on the target"
            )
    done_before = await _progress(conn, source)
    copier = Copier(conn, source, str(await asyncio.to_thread(path.resolve)))
    if not dry_run:
        await copier.load_days()
    for name, kind in PLANS.items():
        if name not in lite_tables:
            continue
        pg = await pg_columns(conn, name)
        if not pg and not dry_run:
            result.skipped.append(name)
            continue
        lite_cols = [r[1] for r in lite.execute(f"PRAGMA table_info({name})")]
        t = plan_table(name, kind, lite_cols, pg) if pg else None
        last, done = (0, 0) if kind in _WHOLE else done_before.get(name, (0, 0))
        left = int(lite.execute(f"SELECT count(*) FROM {name} WHERE rowid > ?", (last,)).fetchone()[0])
        state = result.tables[name] = TableState(name, total=done + left, done=done)
        if on_chunk is not None:
            on_chunk(state)
        if dry_run or t is None:
            continue
        rows = await asyncio.to_thread(_read, lite, t, last, chunk)
        while rows:
            # Read the next chunk while this one is written (the SQLite read and the COPY overlap).
            ahead = asyncio.ensure_future(asyncio.to_thread(_read, lite, t, rows[-1][0], chunk))
            try:
                await copier.chunk(t, rows, state.done + len(rows))
                state.done += len(rows)
                state.copied += len(rows)
                state.total = max(state.total, state.done)
                if on_chunk is not None:
                    on_chunk(state)
                stop = should_stop is not None and should_stop()
            except BaseException:
                # Not cancelled: the read finishes on its thread before the connection may close.
                await asyncio.gather(ahead, return_exceptions=True)
                raise
            if stop:
                await asyncio.gather(ahead, return_exceptions=True)
                result.stopped = True
                return result
            rows = await ahead
        state.finished = True
        if on_chunk is not None:
            on_chunk(state)
    return result
