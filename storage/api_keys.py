"""The ``api_keys`` table (m008): create, list, revoke and load keys. Only hashes are ever stored.

The CLI writes here directly (like ``db prune``): a key created, revoked or rotated is in the file at once,
and every proxy sharing the file picks it up on its next reload (``load_keys``, once a second, off the
request path).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from storage.errors import StorageError, StoreReadError
from storage.migrations import apply_migrations

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
def _database_errors(path: Path) -> Iterator[None]:
    """Callers outside storage see ``StorageError`` naming the file, never sqlite3's own errors."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _open(path: Path) -> sqlite3.Connection:
    """Open (creating and migrating if needed) the database for a key change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=5.0)
    conn.execute("PRAGMA journal_mode=WAL")
    apply_migrations(conn)
    return conn


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(zip(KEY_COLUMNS, row, strict=True))
    out["models"] = orjson.loads(out["models"] or "[]")
    out["admin"] = bool(out["admin"])
    return out


def insert_key(path: Path, row: dict[str, Any]) -> None:
    """Add one key row (``row`` has every column of ``KEY_COLUMNS``; ``models`` a list)."""
    values = [orjson.dumps(row["models"]).decode() if c == "models" else row[c] for c in KEY_COLUMNS]
    with _database_errors(path):
        conn = _open(path)
        try:
            with conn:
                conn.execute(
                    f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(KEY_COLUMNS))})",
                    values,
                )
        finally:
            conn.close()


def _select(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY created_at, id")
    return [_decode(r) for r in cur.fetchall()]


def list_keys(path: Path) -> list[dict[str, Any]]:
    """Every key row, oldest first (creates and migrates the file if needed)."""
    with _database_errors(path):
        conn = _open(path)
        try:
            return _select(conn)
        finally:
            conn.close()


def revoke_key(path: Path, ident: str, at: str) -> dict[str, Any] | None:
    """Set ``revoked_at`` of the key whose id, prefix or name is ``ident`` (unless revoked earlier); the row, or
    None when no key matches. Raises ValueError when it matches more than one key."""
    with _database_errors(path):
        conn = _open(path)
        try:
            every = _select(conn)
            rows = [r for r in every if ident in (r["id"], r["prefix"])]
            if not rows:  # by name: only keys still valid at ``at`` (a rotated name has one live key)
                rows = [
                    r
                    for r in every
                    if r["name"] == ident and (r["revoked_at"] is None or r["revoked_at"] > at)
                ]
            if not rows:
                return None
            if len(rows) > 1:
                raise ValueError(f"{ident!r} matches {len(rows)} keys; give the id")
            row = rows[0]
            if row["revoked_at"] is None or row["revoked_at"] > at:
                with conn:
                    conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (at, row["id"]))
                row["revoked_at"] = at
            return row
        finally:
            conn.close()


def load_keys(path: Path) -> list[dict[str, Any]]:
    """Every key row, read-only (the proxy's reload); [] before m008 made the table."""
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
