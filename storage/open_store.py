"""Pick the store for a configuration: SQLite (the default) or PostgreSQL, from ``storage.url``.

Why here and not in the app: the choice of backend is storage's business, and the app, the CLI and the
benches all need the same rule. ``storage.url`` (env ``OLLAMON_DB_URL``) empty or ``sqlite:PATH`` means the
SQLite file (``storage.db`` when empty); ``postgresql://...`` (or ``postgres://``) means PostgreSQL.
``retention_for`` gives the matching retention job (SQLite's row deletes or PostgreSQL's partition drops).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from storage.base import Maintenance, Store
from storage.postgres.retention import PgRetention
from storage.postgres.store import PostgresStore
from storage.retention import Retention, RetentionPolicy
from storage.sqlite import SQLiteStore

__all__ = ["StorageSettings", "is_postgres_url", "retention_for", "store_for"]


class StorageSettings(Protocol):
    """What ``store_for`` reads (proxy.config.StorageConfig has it)."""

    @property
    def url(self) -> str: ...
    @property
    def db_path(self) -> Path: ...
    @property
    def synchronous(self) -> str: ...
    @property
    def busy_timeout_ms(self) -> int: ...
    @property
    def store_text(self) -> bool: ...


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def store_for(settings: StorageSettings) -> SQLiteStore | PostgresStore:
    """A new, unopened store for ``settings``; ``await store.open()`` next."""
    if is_postgres_url(settings.url):
        return PostgresStore(settings.url, store_text=settings.store_text)
    if settings.url and not settings.url.startswith("sqlite:"):
        raise ValueError(
            f"storage.url must be postgresql://... or sqlite:PATH, not {settings.url.split('@')[-1]!r}"
        )
    return SQLiteStore(
        settings.db_path,
        synchronous="FULL" if settings.synchronous.lower() == "full" else "NORMAL",
        busy_timeout_ms=settings.busy_timeout_ms,
        store_text=settings.store_text,
    )


def retention_for(
    store: Store,
    policy: RetentionPolicy,
    *,
    path: Path | str = "",
    interval_s: float = 3600.0,
    checkpoint_interval_s: float = 300.0,
) -> Maintenance:
    """The retention job for ``store``: partition drops on PostgreSQL, chunked deletes on SQLite."""
    if isinstance(store, PostgresStore):
        return PgRetention(policy, store, interval_s=interval_s)
    where = store.path if isinstance(store, SQLiteStore) else Path(path)
    return Retention(policy, where, interval_s=interval_s, checkpoint_interval_s=checkpoint_interval_s)
