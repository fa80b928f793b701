"""``ollamon db stats`` on PostgreSQL: rows per table, size on disk, day partitions, last retention run.

SQLite's version (storage/browse.py ``db_stats``) reports a file, its WAL and pages; a PostgreSQL database
has none of those, so this one reports the database's size and, per partitioned table, how many day
partitions it has and the first and last day: what retention drops and what an operator checks.
"""

from __future__ import annotations

from typing import Any

from storage.browse import stored
from storage.postgres.schema import PARTITIONED

__all__ = ["db_stats"]


def partitions_of(conn: Any, table: str) -> list[str]:
    """Names of ``table``'s partitions (day partitions are ``<table>_pYYYYMMDD``, plus ``<table>_default``)."""
    sql = (
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ?"
    )
    return [r[0] for r in conn.execute(sql, (table,))]


def db_stats(conn: Any, where: str) -> dict[str, Any]:
    """``conn``: a ``PgSyncConnection``; ``where``: the database URL without its password."""
    size, version = conn.execute(
        "SELECT pg_database_size(current_database()), current_setting('server_version')"
    ).fetchone()
    parts: dict[str, dict[str, Any]] = {}
    for table in PARTITIONED:
        days = sorted(
            f"{d[:4]}-{d[4:6]}-{d[6:8]}"
            for d in (name.rpartition("_p")[2] for name in partitions_of(conn, table))
            if len(d) == 8 and d.isdigit()
        )
        parts[table] = {
            "partitions": len(days),
            "first_day": days[0] if days else None,
            "last_day": days[-1] if days else None,
        }
    return {
        "path": where,
        "backend": "postgresql",
        "server_version": version,
        "database_bytes": size,
        "partitions": parts,
        **stored(conn),
    }
