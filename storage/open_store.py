"""Pick the store for a configuration: SQLite (the default) or PostgreSQL, from ``storage.url``.

Why here and not in the app: the choice of backend is storage's business, and the app, the CLI and the
benches all need the same rule. ``storage.url`` (env ``OLLAMON_DB_URL``) empty or ``sqlite:PATH`` means the
SQLite file (``storage.db`` when empty); ``postgresql://...`` (or ``postgres://``) means PostgreSQL.
``retention_for`` gives the matching retention job (SQLite's row deletes or PostgreSQL's partition drops).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from storage.base import Maintenance, Store
from storage.postgres.lease import maintenance_lease
from storage.postgres.retention import PgRetention
from storage.postgres.store import PostgresStore
from storage.retention import Retention, RetentionPolicy
from storage.sqlite import SQLiteStore
from storage.usage_reads import UsageReads

__all__ = ["AnyStore", "ServedPostgres", "StorageSettings", "is_postgres_url", "retention_for", "store_for"]


class ServedPostgres(PostgresStore):
    """``PostgresStore`` with what the app reads through beside it, as ``SQLiteStore`` has: ``reads`` (every
    named read, storage/reads.py) and ``path`` (the URL without its password, for messages). Here rather than
    in storage/postgres/ because storage.reads imports storage.postgres, not the other way round."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.reads = UsageReads(url)
        self.path = self.where
        self.busy_timeout_ms = int(self.command_timeout_s * 1000)


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


AnyStore = SQLiteStore | ServedPostgres  # what ``store_for`` returns


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def store_for(settings: StorageSettings) -> SQLiteStore | ServedPostgres:
    """A new, unopened store for ``settings``; ``await store.open()`` next."""
    if is_postgres_url(settings.url):
        return ServedPostgres(settings.url, store_text=settings.store_text)
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
    instance: str = "",
) -> Maintenance:
    """The retention job for ``store``: partition drops on PostgreSQL, chunked deletes on SQLite. ``instance``
    names this ollamon as the holder of PostgreSQL's maintenance lease (the host's name when empty)."""
    if isinstance(store, PostgresStore):
        # one instance of a fleet at a time: the holder of the maintenance lease (storage/postgres/lease.py)
        lease = maintenance_lease(store.url, instance or None)
        return PgRetention(policy, store, interval_s=interval_s, lease=lease)
    where = store.path if isinstance(store, SQLiteStore) else Path(path)
    return Retention(policy, where, interval_s=interval_s, checkpoint_interval_s=checkpoint_interval_s)
