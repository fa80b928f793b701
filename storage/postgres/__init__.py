"""The PostgreSQL backend of ``storage.base.Store`` (docs/storage.md, "PostgreSQL")."""

from storage.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
