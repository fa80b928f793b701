"""The read queries' SQL on PostgreSQL: a synchronous connection that speaks enough of ``sqlite3``'s.

Why: every read (storage/queries.py, browse.py, alerts.py, ...) is written once, as plain SQL on a DB-API
connection that the API calls on a worker thread and the CLI calls directly. Writing each again for asyncpg
would be two query layers that drift apart; instead this module gives those functions a connection they
already know how to use, and one shared test (tests/test_pg_reads.py) runs every read on both backends and
compares the answers.

What it translates: the SQL text, parameters and results as storage/sql_compat.py says (placeholders, two
casts, types), and ``PRAGMA table_info(t)``, which becomes a query of the catalogue (``pg_attribute``) with the
same six columns.

SQLite's functions that the reads use (``TOTAL``, ``SUM`` of a comparison, ``group_concat``, ``printf`` of a
float) and the ``sqlite_master`` catalogue exist in the database itself (migration ``p005_sqlite_compat``,
storage/postgres/schema.py). Whatever else differs (bare columns in GROUP BY, NULL ordering) is written
portably in the query modules.

Threads: asyncpg is asynchronous, the callers are not. ``PgSource`` runs one event loop on a daemon thread
per database URL (shared by every ``Reads`` of the process) with a small pool; a call hands its coroutine to
that loop and waits. Callers run on worker threads or in the CLI, never on the app's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.errors import StoreReadError
from storage.postgres.errors import redact
from storage.sql_compat import PgRow, fetch, to_sqlite, translate

__all__ = ["PgCursor", "PgReadError", "PgSource", "PgSyncConnection", "ReadErrors"]

T = TypeVar("T")
# What asyncpg and the network may raise while a statement runs.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PgReadError(Exception):
    """A statement failed in the database or on the way to it (the driver's error is the cause). Raised only
    from work done on the database, so a caller's own OSError (a closed stdout) is never taken for one."""


ReadErrors = (PgReadError,)  # what a read on PostgreSQL raises (storage/reads.py makes it StoreReadError)

# How long a catalogue answer (PRAGMA table_info, sqlite_master) is reused: a migration runs when ollamon
# starts, before its reads; a table a later migration adds is seen at most this long after.
CATALOGUE_TTL_S = 30.0
_PRAGMA_TABLE_INFO = re.compile(r"^\s*PRAGMA\s+table_info\(\s*\"?(\w+)\"?\s*\)\s*;?\s*$", re.IGNORECASE)
# The catalogue itself, not information_schema.columns (the same answer, ~0.5 ms instead of ~9 ms per call).
_TABLE_INFO_SQL = (
    "SELECT a.attnum - 1 AS cid, a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type, "
    "a.attnotnull::int AS notnull, pg_get_expr(d.adbin, d.adrelid) AS dflt_value, 0 AS pk "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
    "WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace AND a.attnum > 0 "
    "AND NOT a.attisdropped ORDER BY a.attnum"
)


class PgCursor:
    """The rows of one statement, fetched; ``fetchone``/``fetchmany``/``fetchall``/iteration/``description``."""

    def __init__(self, rows: list[PgRow], names: Sequence[str]) -> None:
        self._rows = rows
        self._at = 0
        self.description = [(n, None, None, None, None, None, None) for n in names]
        self.rowcount = len(rows)

    def fetchone(self) -> PgRow | None:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchmany(self, size: int = 1) -> list[PgRow]:
        out = self._rows[self._at : self._at + size]
        self._at += len(out)
        return out

    def fetchall(self) -> list[PgRow]:
        out = self._rows[self._at :]
        self._at = len(self._rows)
        return out

    def __iter__(self) -> Iterator[PgRow]:
        while (row := self.fetchone()) is not None:
            yield row


class PgSyncConnection:
    """One pooled asyncpg connection, used synchronously from one thread (see the module docstring)."""

    row_factory: Any = None  # accepted and ignored: every row already reads by name too

    def __init__(self, source: PgSource, conn: Any) -> None:
        self._source = source
        self._conn = conn
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        m = _PRAGMA_TABLE_INFO.match(sql)
        if m:
            sql, params = _TABLE_INFO_SQL, (m.group(1),)
        else:
            sql = translate(sql)
        if sql is _TABLE_INFO_SQL or "sqlite_master" in sql:  # the catalogue: asked several times a summary
            key = (sql, tuple(params))
            hit = self._source.catalogue.get(key)
            if hit is not None and time.monotonic() - hit[0] < CATALOGUE_TTL_S:
                return PgCursor(hit[1], hit[2])
            cur = self._source.run(self._execute(sql, list(params)))
            self._source.catalogue[key] = (time.monotonic(), cur.fetchall(), [d[0] for d in cur.description])
            return PgCursor(*self._source.catalogue[key][1:])
        return self._source.run(self._execute(sql, list(params)))

    async def _execute(self, sql: str, params: list[Any]) -> PgCursor:
        rows, names = await fetch(self._conn, sql, params)
        return PgCursor(rows, names)

    def stream(self, sql: str, params: Sequence[Any] = (), chunk: int = 1000) -> Iterator[Sequence[Any]]:
        """The column names, then the rows of ``sql`` read ``chunk`` at a time by a server-side cursor (constant
        memory, for exports); holds a transaction open until exhausted or closed."""
        sql = translate(sql)
        tx = self._conn.transaction(readonly=True)
        self._source.run(tx.start())
        try:
            cur = self._source.run(self._cursor(sql, params))
            names = self._source.run(self._names(sql))
            yield names
            while rows := self._source.run(cur.fetch(chunk)):
                yield from (tuple(to_sqlite(v) for v in r) for r in rows)
        finally:
            self._source.run(tx.rollback())

    async def _cursor(self, sql: str, params: Sequence[Any]) -> Any:
        return await self._conn.cursor(sql, *params)

    async def _names(self, sql: str) -> list[str]:
        return [a.name for a in (await self._conn.prepare(sql)).get_attributes()]

    def close(self) -> None:
        """Nothing to do: ``PgSource.connection`` gives the connection back to the pool."""


class PgSource:
    """A PostgreSQL database for synchronous readers: an event loop on a daemon thread and a small pool.

    One per URL per process (``PgSource.for_url``); ``connection()`` lends a ``PgSyncConnection``."""

    _by_url: dict[str, PgSource] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, *, max_size: int = 4, command_timeout_s: float = 30.0) -> None:
        self.url = url
        self.where = redact(url)
        self.max_size = max_size
        self.command_timeout_s = command_timeout_s
        self._pool: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ollamon-pg-reads", daemon=True)
        self._pool_lock = threading.Lock()
        self._start_lock = threading.Lock()
        # (sql, params) -> (when, rows, names): the tables and their columns change only with a migration
        self.catalogue: dict[tuple[str, tuple[Any, ...]], tuple[float, list[PgRow], list[str]]] = {}

    @classmethod
    def for_url(cls, url: str) -> PgSource:
        with cls._lock:
            src = cls._by_url.get(url)
            if src is None or src._loop.is_closed():
                src = cls._by_url[url] = cls(url)
            return src

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this source's loop and wait for it (from any thread but that loop's)."""
        if not self._thread.is_alive():
            with self._start_lock:
                if not self._thread.is_alive() and not self._loop.is_closed():
                    self._thread.start()  # on first use: a Reads that never reads costs no thread
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self.command_timeout_s + 5.0)
        except TimeoutError as exc:
            fut.cancel()
            raise PgReadError(f"TimeoutError: no answer in {self.command_timeout_s + 5.0:.0f} s") from exc
        except _DRIVER_ERRORS as exc:
            raise PgReadError(f"{type(exc).__name__}: {exc}") from exc

    def _ensure_pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self.run(self._create_pool())
            return self._pool

    async def _create_pool(self) -> Any:
        # Created on the loop it will live on (asyncpg binds a pool to the running loop).
        return await asyncpg.create_pool(
            self.url,
            min_size=0,
            max_size=self.max_size,
            command_timeout=self.command_timeout_s,
            timeout=10.0,
            max_inactive_connection_lifetime=60.0,
            reset=_no_reset,
        )

    async def _acquire(self, pool: Any) -> Any:
        return await pool.acquire(timeout=self.command_timeout_s)

    @contextmanager
    def connection(self) -> Iterator[PgSyncConnection]:
        try:
            pool = self._ensure_pool()
            conn = self.run(self._acquire(pool))
        except (PgReadError, ValueError) as exc:
            raise StoreReadError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            yield PgSyncConnection(self, conn)
        finally:
            self.release(conn)

    def release(self, conn: Any) -> None:
        if self._pool is not None and not self._loop.is_closed():
            try:
                self.run(self._pool.release(conn))
            except (PgReadError, RuntimeError):
                pass

    def close(self) -> None:
        """Close the pool and stop the loop (at exit, or in tests)."""
        with PgSource._lock:
            if PgSource._by_url.get(self.url) is self:
                del PgSource._by_url[self.url]
        if self._loop.is_closed():
            return
        if self._pool is not None:
            try:
                self.run(asyncio.wait_for(self._pool.close(), 5.0))
            except (PgReadError, RuntimeError):
                self._pool.terminate()
            self._pool = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        self._loop.close()


async def _no_reset(conn: Any) -> None:
    """The pool's reset on release, which is a round trip (``RESET ALL``, ``UNLISTEN *``, advisory unlocks) by
    default: the reads set nothing in a session to reset (``stream`` ends its own transaction)."""


def _close_all() -> None:
    for src in list(PgSource._by_url.values()):
        src.close()


atexit.register(_close_all)
