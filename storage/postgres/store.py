"""The PostgreSQL store: the same ``Store`` as SQLite's, on a small asyncpg pool, one transaction per batch.

Why a pool of two: the writer task uses one connection at a time (a batch or a write job, never both), and
``health()`` must answer while a long batch runs. A connection that breaks is replaced by the pool on its
next use, so after an outage the writer's retry simply works once the server is back.

A batch, in ONE transaction: the missing day partitions are created, the append-only tables get binary
``COPY`` (inference, errors, text, samples), the rest their upserts, and the rollup and usage hooks add the
batch up. All of it or none of it. The COPYs run as a task while the rollups' Python work runs on the event
loop beside them (it yields between its steps), so the server inserts while Python adds up. Rows go as they are first (storage/postgres/rows.py): when a value does
not fit, the batch is redone once with every value checked, which converts what it can and names the records
that cannot be stored.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.base import Health, WriteFn
from storage.errors import RecordRejectedError, StoreUnavailableError
from storage.postgres import partitions
from storage.postgres.errors import PgOpenError, classify, redact, retryable
from storage.postgres.rollups import PgRollupHook, PgUsageHook
from storage.postgres.schema import PARTITIONED, apply_migrations
from storage.postgres.tables import SPECS, TEXT_SPEC, row
from storage.records import ErrorRecord, InferenceRecord, Record

__all__ = ["PgBatchHook", "PgTypeWriter", "PostgresStore"]

logger = logging.getLogger(__name__)

# Writes the records of one registered type inside the batch transaction.
PgTypeWriter = Callable[[asyncpg.Connection, list[Any]], Awaitable[None]]
# Runs inside the batch transaction after every insert, seeing the whole batch (rollups, usage).
PgBatchHook = Callable[[asyncpg.Connection, Sequence[Record]], Awaitable[None]]
T = TypeVar("T")
# Serialises partition creation between instances sharing one database (any constant key).
_PARTITION_LOCK = 0x6F6C6C616D6F6F
_SQLITE_HOOKS = ("RollupHook", "UsageHook")  # storage.rollups / storage.usage_rollup: SQLite's own


def _days(rows: Sequence[Sequence[Any]], at: int) -> set[str]:
    """The partition days of ``rows``' timestamps (column ``at``): ``day_of`` of each distinct first ten
    characters, which is ``day_of`` of the timestamp (a batch holds one or two days: ~500 calls saved)."""
    heads = {t[:10] if type(t := r[at]) is str else None for r in rows}
    return {d for h in heads if h is not None and (d := partitions.day_of(h)) is not None}


class PostgresStore:
    """``Store`` backed by PostgreSQL (``postgresql://`` URL), raw tables partitioned by day."""

    def __init__(
        self,
        url: str,
        *,
        store_text: bool = False,
        days_ahead: int = 2,
        command_timeout_s: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.store_text = store_text
        self.days_ahead = days_ahead
        self.command_timeout_s = command_timeout_s
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._days: dict[str, set[str]] = {t: set() for t in PARTITIONED}
        self._reload = False
        self._type_writers: dict[type, PgTypeWriter] = {}
        self._hooks: list[PgBatchHook] = []
        self.rollups: PgRollupHook | None = None

    # -- extension points ------------------------------------------------------------------------

    def register(self, record_type: type, write: PgTypeWriter) -> None:
        """Let batches carry ``record_type``: ``write(conn, items)`` inserts them in the batch transaction."""
        self._type_writers[record_type] = write

    def add_hook(self, hook: PgBatchHook) -> None:
        """Run ``hook(conn, records)`` in every batch transaction after the inserts; a hook of a class
        already added replaces it. SQLite's rollup and usage hooks are ignored: this store runs its own."""
        if type(hook).__name__ in _SQLITE_HOOKS and type(hook).__module__.startswith("storage."):
            logger.debug(
                "%s: %s not added, the PostgreSQL store keeps its own", self.where, type(hook).__name__
            )
            return
        self._hooks = [h for h in self._hooks if type(h) is not type(hook)]
        self._hooks.append(hook)

    # -- lifecycle -------------------------------------------------------------------------------

    def _today(self) -> _dt.date:
        now = self._clock() if self._clock is not None else None
        return (
            _dt.datetime.fromtimestamp(now, _dt.UTC).date()
            if now is not None
            else _dt.datetime.now(_dt.UTC).date()
        )

    async def open(self) -> None:
        """Connect, migrate, create today's partitions and the next ``days_ahead`` days'."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=2, command_timeout=self.command_timeout_s, timeout=10.0
            )
            async with self._pool.acquire() as conn:
                applied = await apply_migrations(conn)
                await self._load_days(conn)
                today = self._today()
                days = {(today + _dt.timedelta(days=d)).isoformat() for d in range(-1, self.days_ahead + 1)}
                async with conn.transaction():
                    await self._ensure_days(conn, {t: days for t in PARTITIONED})
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            await self.close()
            raise PgOpenError(self.where, f"{type(exc).__name__}: {exc}") from exc
        self.rollups = PgRollupHook(usage=True)  # usage_hour too, in the same statement as the rollups
        others = [h for h in self._hooks if not isinstance(h, PgRollupHook | PgUsageHook)]
        self._hooks = [self.rollups, *others]
        if applied:
            logger.info("%s: applied migrations %s", self.where, ", ".join(applied))

    async def close(self) -> None:
        """Close the pool (waiting a little for connections in use); safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=5.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("%s: closing the pool: %s; terminating it", self.where, exc)
            pool.terminate()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailableError(f"{self.where}: the store is not open")
        async with self._pool.acquire(timeout=self.command_timeout_s) as conn:
            yield conn

    # -- partitions ------------------------------------------------------------------------------

    async def _load_days(self, conn: asyncpg.Connection) -> None:
        for table in PARTITIONED:
            self._days[table] = await partitions.existing_days(conn, table)

    async def _ensure_days(
        self, conn: asyncpg.Connection, needed: dict[str, set[str]]
    ) -> dict[str, set[str]]:
        """Create the partitions of ``needed`` that are missing, in the caller's transaction; returns them
        (added to the cache only once that transaction committed)."""
        if self._reload:
            await self._load_days(conn)
            self._reload = False
        missing = {t: days - self._days[t] for t, days in needed.items() if days - self._days[t]}
        if missing:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _PARTITION_LOCK)
            for table, days in missing.items():
                for day in sorted(days):
                    await partitions.create_day(conn, table, day)
        return missing

    def forget_days(self) -> None:
        """Reload the partition list on the next batch (after retention dropped some, or an outage)."""
        self._reload = True

    # -- writing ---------------------------------------------------------------------------------

    def _rows(
        self, records: Sequence[Record], checked: bool
    ) -> tuple[dict[type, list[Any]], list[tuple[Any, ...]]]:
        """Typed rows per record type, plus request_text rows; ``RecordRejectedError`` names bad records."""
        rows: dict[type, list[Any]] = {}
        texts: dict[str, tuple[Any, ...]] = {}
        bad: list[int] = []
        reasons: list[str] = []
        for i, rec in enumerate(records):
            try:
                kind: type = type(rec)
                if isinstance(rec, InferenceRecord):
                    kind = InferenceRecord
                    rows.setdefault(kind, []).append(row(rec, SPECS[kind], checked))
                    if rec.error is not None:
                        rows.setdefault(ErrorRecord, []).append(row(rec.error, SPECS[ErrorRecord], checked))
                    if self.store_text and (rec.prompt_text is not None or rec.response_text is not None):
                        texts[rec.request_id] = row(rec, TEXT_SPEC, checked)  # a repeated id keeps the last
                elif isinstance(rec, ErrorRecord):
                    rows.setdefault(ErrorRecord, []).append(row(rec, SPECS[ErrorRecord], checked))
                elif kind in SPECS:
                    rows.setdefault(kind, []).append(row(rec, SPECS[kind], checked))
                elif kind in self._type_writers:
                    rows.setdefault(kind, []).append(rec)
                else:
                    raise TypeError(f"not a record: {kind.__name__}")
            except (TypeError, ValueError, OverflowError) as exc:
                if not checked:
                    raise  # write_batch redoes the batch checked, which fixes what it can and names the rest
                bad.append(i)
                reasons.append(f"#{i}: {exc}")
        if bad:
            raise RecordRejectedError(
                f"{len(bad)} record(s) cannot be stored: {'; '.join(reasons)}", tuple(bad)
            )
        return rows, list(texts.values())

    def _needed_days(self, rows: dict[type, list[Any]], texts: list[tuple[Any, ...]]) -> dict[str, set[str]]:
        needed: dict[str, set[str]] = {}
        for kind, items in rows.items():
            s = SPECS.get(kind)
            if s is None or s.table not in PARTITIONED:
                continue
            needed.setdefault(s.table, set()).update(_days(items, s.columns.index("timestamp")))
        if texts:
            needed.setdefault("request_text", set()).update(_days(texts, 1))
        return needed

    async def _insert(self, conn: asyncpg.Connection, kind: type, items: list[Any]) -> None:
        s = SPECS.get(kind)
        if s is None:
            await self._type_writers[kind](conn, items)
        elif s.upsert:
            await conn.executemany(s.upsert, items)
        else:
            await conn.copy_records_to_table(s.table, records=items, columns=s.columns)

    async def _inserts(
        self, conn: asyncpg.Connection, rows: dict[type, list[Any]], texts: list[tuple[Any, ...]]
    ) -> None:
        for kind, items in rows.items():
            await self._insert(conn, kind, items)
        if texts:
            ids = [t[0] for t in texts]
            await conn.execute("DELETE FROM request_text WHERE request_id = ANY($1::text[])", ids)
            await conn.copy_records_to_table("request_text", records=texts, columns=TEXT_SPEC.columns)

    async def write_batch(self, records: Sequence[Record]) -> None:
        """COPY ``records`` (and the rollups they add to) in one transaction; see ``Store.write_batch``.

        First with the values as they are; when a value does not fit its column (asyncpg's encoders or the
        server refuse it), the transaction is gone and the batch is redone once with every value checked
        and converted, which names the records that still cannot be stored."""
        try:
            await self._write(records, checked=False)
        except (TypeError, ValueError, OverflowError, asyncpg.DataError):
            await self._write(records, checked=True)

    async def _write(self, records: Sequence[Record], *, checked: bool) -> None:
        rows, texts = self._rows(records, checked)  # checked: RecordRejectedError names the bad ones
        needed = self._needed_days(rows, texts)
        try:
            async with self._conn() as conn, conn.transaction():
                created = await self._ensure_days(conn, needed)
                rollups = self.rollups if self._hooks and self._hooks[0] is self.rollups else None
                # The inserts run while the rollups are added up: the server works as Python does.
                inserts = asyncio.ensure_future(self._inserts(conn, rows, texts))
                try:
                    prepared = await rollups.prepare(records) if rollups is not None else None
                except BaseException:
                    await asyncio.wait([inserts])  # the connection is free again before the rollback
                    if not inserts.cancelled():
                        inserts.exception()  # retrieved: the error being raised is the batch's
                    raise
                await inserts
                for hook in self._hooks:
                    if hook is rollups and rollups is not None:
                        await rollups.write(conn, prepared)
                    else:
                        await hook(conn, records)
        except Exception as exc:
            if not checked and isinstance(exc, TypeError | ValueError | OverflowError | asyncpg.DataError):
                raise  # write_batch redoes the batch with every value checked
            error = classify(self.where, exc)
            if isinstance(error, StoreUnavailableError):
                self.forget_days()  # the server may have come back without what we created
            if error is exc:
                raise
            raise error from exc
        for table, days in created.items():
            self._days[table] |= days

    async def execute_write(self, fn: WriteFn[T], *, transaction: bool = True) -> T:
        """Run the write job ``fn(conn)`` on a pooled connection, with ``transaction`` inside one transaction
        (rolled back when it raises). Only the writer task calls this."""
        try:
            async with self._conn() as conn:
                if not transaction:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)
        except Exception as exc:
            if isinstance(exc, StoreUnavailableError | RecordRejectedError):
                raise
            if retryable(exc) or isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
                raise classify(self.where, exc) from exc
            raise

    # -- reading ---------------------------------------------------------------------------------

    async def health(self) -> Health:
        """``"ok"`` if a trivial query answers within a second, else ``"down"``; never raises."""
        try:
            async with asyncio.timeout(1.0), self._conn() as conn:
                await conn.fetchval("SELECT 1")
        except Exception:  # any failure is "down": health never raises
            return "down"
        return "ok"

    async def count(self, table: str) -> int:
        """Number of rows in one of the raw tables (tests and benches)."""
        if table not in PARTITIONED:
            raise ValueError(f"unknown table {table!r}; expected one of {', '.join(PARTITIONED)}")
        async with self._conn() as conn:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
