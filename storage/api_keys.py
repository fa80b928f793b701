"""The ``api_keys`` table (m008): create, list, revoke and load keys. Only hashes are ever stored.

The CLI writes here directly (like ``db prune``), to the SQLite file or the PostgreSQL database: a key
created, revoked or rotated is in the database at once, and every proxy sharing it picks it up on its next
reload (``load_keys``, once a second, off the request path).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from storage.errors import StorageError, StoreReadError
from storage.migrations import apply_migrations
from storage.postgres.errors import redact
from storage.postgres.store import PostgresStore
from storage.postgres.sync_conn import PgReadError, PgSource
from storage.reads import is_postgres_url

__all__ = ["KEY_COLUMNS", "insert_key", "list_keys", "load_keys", "revoke_key"]

KEY_COLUMNS = (
    "id",
    "hash",
    "prefix",
    "name",
    "owner",
    "team",
    "models",
    "rpm",
    "tpm",
    "concurrency",
    "admin",
    "expires_at",
    "revoked_at",
    "created_at",
)


@contextmanager
def _database_errors(path: Path | str) -> Iterator[None]:
    """Callers outside storage see ``StorageError`` naming the file, never the driver's own errors."""
    try:
        yield
    except (sqlite3.Error, PgReadError) as exc:
        raise StorageError(f"{_where(path)}: {type(exc).__name__}: {exc}") from exc


def _where(path: Path | str) -> str:
    return redact(str(path)) if is_postgres_url(path) else str(path)


_MIGRATED: set[str] = set()


@contextmanager
def _open(path: Path | str) -> Iterator[Any]:
    """The database for a key change, created and migrated if needed: a SQLite file, or PostgreSQL (each
    statement there commits by itself; every change here is one statement)."""
    if isinstance(path, str) and is_postgres_url(path):
        if path not in _MIGRATED:  # once per process: the CLI's first change, or a proxy's first reload
            _migrate_postgres(path)
            _MIGRATED.add(path)
        try:
            with PgSource.for_url(path).connection() as conn:
                yield conn
        except StoreReadError as exc:
            raise StorageError(str(exc)) from exc
        return
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    lite = sqlite3.connect(file, timeout=5.0)
    try:
        lite.execute("PRAGMA journal_mode=WAL")
        apply_migrations(lite)
        yield lite
    finally:
        lite.close()


def _migrate_postgres(url: str) -> None:
    async def go() -> None:
        store = PostgresStore(url)
        await store.open()  # migrates; PgOpenError (a StorageError) names the database
        await store.close()

    with ThreadPoolExecutor(1) as pool:  # asyncio.run needs a thread without a running loop
        pool.submit(lambda: asyncio.run(go())).result()


@contextmanager
def _transaction(conn: Any) -> Iterator[None]:
    if isinstance(conn, sqlite3.Connection):
        with conn:
            yield
    else:
        yield


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(zip(KEY_COLUMNS, row, strict=True))
    out["models"] = orjson.loads(out["models"] or "[]")
    out["admin"] = bool(out["admin"])
    return out


def insert_key(path: Path | str, row: dict[str, Any]) -> None:
    """Add one key row (``row`` has every column of ``KEY_COLUMNS``; ``models`` a list)."""
    values = [orjson.dumps(row["models"]).decode() if c == "models" else row[c] for c in KEY_COLUMNS]
    with _database_errors(path), _open(path) as conn, _transaction(conn):
        conn.execute(
            f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({', '.join('?' * len(KEY_COLUMNS))})",
            values,
        )


def _select(conn: Any) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY created_at, id")
    return [_decode(r) for r in cur.fetchall()]


def list_keys(path: Path | str) -> list[dict[str, Any]]:
    """Every key row, oldest first (creates and migrates the file if needed)."""
    with _database_errors(path), _open(path) as conn:
        return _select(conn)


def revoke_key(path: Path | str, ident: str, at: str) -> dict[str, Any] | None:
    """Set ``revoked_at`` of the key whose id, prefix or name is ``ident`` (unless revoked earlier); the row, or
    None when no key matches. Raises ValueError when it matches more than one key."""
    with _database_errors(path), _open(path) as conn:
        every = _select(conn)
        rows = [r for r in every if ident in (r["id"], r["prefix"])]
        if not rows:  # by name: only keys still valid at ``at`` (a rotated name has one live key)
            rows = [
                r for r in every if r["name"] == ident and (r["revoked_at"] is None or r["revoked_at"] > at)
            ]
        if not rows:
            return None
        if len(rows) > 1:
            raise ValueError(f"{ident!r} matches {len(rows)} keys; give the id")
        row = rows[0]
        if row["revoked_at"] is None or row["revoked_at"] > at:
            with _transaction(conn):
                conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (at, row["id"]))
            row["revoked_at"] = at
        return row


def load_keys(path: Path | str) -> list[dict[str, Any]]:
    """Every key row, read-only (the proxy's reload); [] before m008 made the table."""
    if is_postgres_url(path):
        with _database_errors(path), _open(path) as pg:  # migrated on the first reload: the table exists
            return _select(pg)
    path = Path(path)
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        raise StoreReadError(f"{path}: cannot open the database: {exc}") from exc
    try:
        return _select(conn)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise StoreReadError(f"{path}: {exc}") from exc
    finally:
        conn.close()
