"""One SQL text for both backends' write jobs: ``portable(db)`` wraps the connection a write job is given.

Why: a write job (``WriteExecutor.execute_write(fn)``) receives the store's own connection, aiosqlite's on
SQLite and asyncpg's on PostgreSQL. Jobs that are not about one backend's mechanics (an alert saved, a
delivery recorded) are written once against this small interface, in SQLite's dialect with ``?``
placeholders; on PostgreSQL the text is translated and the parameters coerced exactly as the reads' are
(storage/postgres/sync_conn.py). Use ``INSERT ... RETURNING id`` (both engines have it) where SQLite code
would read ``lastrowid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import aiosqlite

from storage.sql_compat import execute_many, fetch, translate

__all__ = ["AsyncSql", "portable"]


class AsyncSql(Protocol):
    async def run(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Execute ``sql``; the rows it returns (a SELECT, or RETURNING), else []."""
        ...

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Execute ``sql`` once per row of parameters."""
        ...


class _Lite:
    __slots__ = ("db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def run(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        async with self.db.execute(sql, list(params)) as cur:
            return list(await cur.fetchall())

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.db.executemany(sql, [list(r) for r in rows])


class _Pg:
    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def run(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        rows, _ = await fetch(self.conn, translate(sql), params)
        return list(rows)

    async def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await execute_many(self.conn, translate(sql), rows)


def portable(db: Any) -> AsyncSql:
    """``db`` (a write job's connection: aiosqlite's or asyncpg's) behind ``AsyncSql``."""
    if isinstance(db, aiosqlite.Connection):
        return _Lite(db)
    return _Pg(db)
