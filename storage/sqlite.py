"""The embedded store: SQLite through aiosqlite, one transaction per batch or write job.

This module owns the file: nothing outside ``storage/`` opens it. Two connections: the writer's (used only
by the single writer task: batches and write jobs) and a query-only reader for health checks, so a long
read never sits in front of a write on aiosqlite's worker thread. The API and the CLI read through
``storage.reads.Reads`` (``store.reads``), on connections of their own; WAL lets them run beside the
writer. ``open()`` registers what the schema needs on every batch: the resource record types and the
rollup hook. The schema comes from ``storage.migrations``; docs/storage.md describes it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import orjson

from storage.base import Health, WriteFn
from storage.errors import RecordRejectedError, StorageError, StoreOpenError, StoreUnavailableError
from storage.migrations import apply_migrations
from storage.records import ErrorRecord, InferenceRecord, Record
from storage.resources import register_resources
from storage.rollups import RollupHook
from storage.row_encoding import (
    ERROR_ORDER,
    INFERENCE_ORDER,
    JSON_COLUMNS,
    error_row,
    inference_row,
    scalar,
)
from storage.usage_reads import UsageReads
from storage.usage_rollup import UsageHook

__all__ = ["TABLES", "BatchHook", "SQLiteStore", "TypeWriter"]

logger = logging.getLogger(__name__)

Synchronous = Literal["NORMAL", "FULL"]
TABLES = ("inference_metrics", "error_metrics", "request_text")

# Writes the records of one registered type inside the batch transaction.
TypeWriter = Callable[[aiosqlite.Connection, list[Any]], Awaitable[None]]
# Runs inside the batch transaction after every insert, seeing the whole batch (e.g. rollups).
BatchHook = Callable[[aiosqlite.Connection, Sequence[Record]], Awaitable[None]]

_BOOL_COLUMNS = frozenset({"success", "stream", "cancelled", "cloud"})
T = TypeVar("T")


def _insert_sql(table: str, columns: Sequence[str], verb: str = "INSERT") -> str:
    return f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_INSERT_INFERENCE = _insert_sql("inference_metrics", INFERENCE_ORDER)
_INSERT_ERROR = _insert_sql("error_metrics", ERROR_ORDER)
# A repeated request id replaces its text instead of failing the whole batch on the primary key.
_INSERT_TEXT = _insert_sql(
    "request_text", ("request_id", "timestamp", "prompt_text", "response_text"), "INSERT OR REPLACE"
)


def _decode_inference(row: dict[str, Any]) -> dict[str, Any]:
    """Undo the storage encoding so a row reads like the record it came from."""
    for c in _BOOL_COLUMNS:
        if row.get(c) is not None:
            row[c] = bool(row[c])
    for c in JSON_COLUMNS:
        if row.get(c) is not None:
            row[c] = orjson.loads(row[c])
    return row


def _closed_connection(exc: BaseException) -> bool:
    """aiosqlite's "no active connection" / "Connection closed", sqlite3's "closed database"."""
    text = str(exc)
    return text in ("no active connection", "Connection closed") or "closed database" in text


def _classify(path: Path, exc: Exception) -> StorageError:
    """What a failure inside a write transaction means for the writer: retry, or never."""
    if isinstance(exc, StoreUnavailableError | RecordRejectedError):
        return exc
    what = f"{path}: {type(exc).__name__}: {exc}"
    if isinstance(exc, sqlite3.OperationalError):  # locked, busy, disk full, I/O, read-only: may pass
        return StoreUnavailableError(what)
    if isinstance(exc, sqlite3.ProgrammingError | ValueError):
        return StoreUnavailableError(what) if _closed_connection(exc) else RecordRejectedError(what)
    if isinstance(
        exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError | sqlite3.NotSupportedError
    ):
        return RecordRejectedError(what)
    if isinstance(exc, sqlite3.Error):  # the file itself is in trouble (malformed, not a database): retry
        return StoreUnavailableError(what)
    # A registered type writer or a batch hook failed on these records: the writer retries them one at a
    # time, so only the record that causes it is replaced, instead of retrying forever.
    return RecordRejectedError(what)


class SQLiteStore:
    """``Store`` backed by one SQLite file in WAL mode."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 5000,
        store_text: bool = False,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self.store_text = store_text
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._type_writers: dict[type, TypeWriter] = {}
        self._hooks: list[BatchHook] = []
        self.rollups: RollupHook | None = None  # registered by open() once the schema has rollups
        self.reads = UsageReads(self.path, busy_timeout_ms=busy_timeout_ms)

    # -- extension points ------------------------------------------------------------------------

    def register(self, record_type: type, write: TypeWriter) -> None:
        """Let batches carry ``record_type``: ``write(db, items)`` inserts them in the batch transaction."""
        self._type_writers[record_type] = write

    def add_hook(self, hook: BatchHook) -> None:
        """Run ``hook(db, records)`` inside every batch transaction, after the inserts. A hook of a class
        already added replaces it, so a second ``RollupHook`` cannot count every row twice."""
        self._hooks = [h for h in self._hooks if type(h) is not type(hook)]
        self._hooks.append(hook)

    async def _register_own(self, db: aiosqlite.Connection) -> None:
        """What every batch needs: the resource record types, and the rollups once m003 made their tables."""
        register_resources(self)
        tables = {
            r[0] for r in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "rollup_minute" in tables and "rollup_hour" in tables:
            self.rollups = RollupHook()
            self.add_hook(self.rollups)
        if "usage_hour" in tables:
            self.add_hook(UsageHook())

    # -- lifecycle -------------------------------------------------------------------------------

    def _wal(self, conn: sqlite3.Connection) -> Any:
        """Switch to WAL. Changing the journal mode can fail at once with "database is locked" while another
        process migrates the same new file (SQLite skips the busy handler there), so retry within the busy
        timeout."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def _prepare(self) -> list[str]:
        """Create the directory, switch the file to WAL and migrate it: blocking work, run in a thread."""
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreOpenError(where, f"cannot create directory {str(self.path.parent)!r}: {exc}") from exc
        if self.path.is_dir():
            raise StoreOpenError(where, "it is a directory")
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000)
        try:
            mode = self._wal(conn)
            if str(mode).lower() != "wal":
                logger.warning(
                    "%s: journal_mode is %s, not wal; readers may block the writer", self.path, mode
                )
            return apply_migrations(conn)
        finally:
            conn.close()

    async def open(self) -> None:
        """Create the directory and the file if needed, migrate, and open both connections."""
        try:
            applied = await asyncio.to_thread(self._prepare)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            await self._db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            await self._register_own(self._db)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            await self._reader.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreOpenError(str(self.path), str(exc)) from exc
        if applied:
            logger.info("%s: applied migrations %s", self.path, ", ".join(applied))

    async def close(self) -> None:
        """Close both connections; safe to call twice."""
        for conn in (self._db, self._reader):
            if conn is not None:
                try:
                    await conn.close()
                except (sqlite3.Error, ValueError) as exc:
                    logger.warning("%s: error while closing: %s", self.path, exc)
        self._db = self._reader = None

    def _writer_conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailableError(f"{self.path}: the store is not open")
        return self._db

    def _reader_conn(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreUnavailableError(f"{self.path}: the store is not open")
        return self._reader

    # -- writing ---------------------------------------------------------------------------------

    def _rows(
        self, records: Sequence[Record]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], dict[type, list[Any]]]:
        other: dict[type, list[Any]] = {}
        inference: list[tuple[Any, ...]] = []
        errors: list[tuple[Any, ...]] = []
        texts: list[tuple[Any, ...]] = []
        bad: list[int] = []
        reasons: list[str] = []
        for i, rec in enumerate(records):
            try:
                if isinstance(rec, InferenceRecord):
                    row = inference_row(rec)
                    err = error_row(rec.error) if rec.error is not None else None
                    text = None
                    if self.store_text and (rec.prompt_text is not None or rec.response_text is not None):
                        fields = (rec.request_id, rec.timestamp, rec.prompt_text, rec.response_text)
                        text = tuple(scalar("request_text", v) for v in fields)
                    inference.append(row)
                    if err is not None:
                        errors.append(err)
                    if text is not None:
                        texts.append(text)
                elif isinstance(rec, ErrorRecord):
                    errors.append(error_row(rec))
                elif type(rec) in self._type_writers:
                    other.setdefault(type(rec), []).append(rec)
                else:
                    raise TypeError(f"not a record: {type(rec).__name__}")
            except (TypeError, ValueError, OverflowError) as exc:  # orjson.JSONEncodeError is a TypeError
                bad.append(i)
                reasons.append(f"#{i}: {exc}")
        if bad:
            raise RecordRejectedError(
                f"{len(bad)} record(s) cannot be stored: {'; '.join(reasons)}", tuple(bad)
            )
        return inference, errors, texts, other

    async def write_batch(self, records: Sequence[Record]) -> None:
        """Insert ``records`` in one ``BEGIN IMMEDIATE`` ... ``COMMIT``; see ``Store.write_batch``."""
        inference, errors, texts, other = self._rows(records)
        db = self._writer_conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                if inference:
                    await db.executemany(_INSERT_INFERENCE, inference)
                if errors:
                    await db.executemany(_INSERT_ERROR, errors)
                if texts:
                    await db.executemany(_INSERT_TEXT, texts)
                for record_type, items in other.items():
                    await self._type_writers[record_type](db, items)
                for hook in self._hooks:
                    await hook(db, records)
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback(db)
                raise
        except Exception as exc:
            error = _classify(self.path, exc)
            if error is exc:
                raise
            raise error from exc

    async def execute_write(self, fn: WriteFn[T], *, transaction: bool = True) -> T:
        """Run the write job ``fn(db)`` on the writer's connection: with ``transaction`` inside one
        ``BEGIN IMMEDIATE ... COMMIT`` (rolled back when it raises), else as it is (VACUUM, checkpoints).
        Only the writer task calls this, so nothing else is ever in flight on the connection."""
        db = self._writer_conn()
        try:
            if not transaction:
                return await fn(db)
            await db.execute("BEGIN IMMEDIATE")
            try:
                result = await fn(db)
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback(db)
                raise
            return result
        except sqlite3.Error as exc:
            raise _classify(self.path, exc) from exc
        except ValueError as exc:
            if _closed_connection(exc):
                raise StoreUnavailableError(f"{self.path}: {exc}") from exc
            raise

    async def _rollback(self, db: aiosqlite.Connection) -> None:
        try:
            if db.in_transaction:
                await db.execute("ROLLBACK")
        except (sqlite3.Error, ValueError) as exc:
            logger.warning("%s: rollback failed: %s", self.path, exc)

    # -- reading ---------------------------------------------------------------------------------

    async def health(self) -> Health:
        """``"ok"`` if a trivial query answers within a second on the reader connection."""
        try:
            async with asyncio.timeout(1.0):
                await self._reader_conn().execute_fetchall("SELECT 1")
        except (sqlite3.Error, ValueError, TimeoutError, StoreUnavailableError):
            return "down"
        return "ok"

    async def count(self, table: str) -> int:
        """Number of rows in one of ``TABLES``."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
        rows = list(await self._reader_conn().execute_fetchall(f"SELECT count(*) FROM {table}"))
        return int(rows[0][0])
