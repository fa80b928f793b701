"""Day partitions of the raw tables: create them ahead, create a missing one inside a batch, drop old ones.

Why by day on the text timestamp: retention then drops whole tables (instant, no dead rows, no vacuum debt)
instead of deleting millions of rows, and a query on a time window reads only its days' partitions. A
partition ``{table}_pYYYYMMDD`` holds ``[YYYY-MM-DD, next day)`` byte-wise, i.e. every ISO timestamp of that
UTC day. ``{table}_default`` holds timestamps that do not start with a date; when a new day's range covers
rows already there, they move into the new partition first (PostgreSQL refuses the partition otherwise).
"""

from __future__ import annotations

import datetime as _dt
import re

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

__all__ = ["create_day", "day_of", "drop_day", "existing_days", "next_day", "partition_name"]

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_NAME = re.compile(r"_p(\d{8})$")


def day_of(timestamp: object) -> str | None:
    """``YYYY-MM-DD`` of an ISO timestamp, or None when it does not start with a real date."""
    if not isinstance(timestamp, str) or not _DAY.match(timestamp):
        return None
    head = timestamp[:10]
    try:
        _dt.date.fromisoformat(head)
    except ValueError:
        return None
    return head


def next_day(day: str) -> str:
    return (_dt.date.fromisoformat(day) + _dt.timedelta(days=1)).isoformat()


def partition_name(table: str, day: str) -> str:
    return f"{table}_p{day.replace('-', '')}"


async def existing_days(conn: asyncpg.Connection, table: str) -> set[str]:
    """The days that have a partition of ``table`` now."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        table,
    )
    out = set()
    for r in rows:
        m = _NAME.search(r[0])
        if m:
            d = m.group(1)
            out.add(f"{d[:4]}-{d[4:6]}-{d[6:]}")
    return out


async def create_day(conn: asyncpg.Connection, table: str, day: str) -> None:
    """Create ``table``'s partition for ``day`` (no-op if it exists). Runs in the caller's transaction."""
    name, lo, hi = partition_name(table, day), day, next_day(day)
    default = f"{table}_default"
    stray = await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {default} WHERE timestamp >= $1 AND timestamp < $2)", lo, hi
    )
    if not stray:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{lo}') TO ('{hi}')"
        )
        return
    # Rows of odd timestamps sort into this day's range: move them out of the default, then attach.
    await conn.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)")
    await conn.execute(
        f"WITH moved AS (DELETE FROM {default} WHERE timestamp >= $1 AND timestamp < $2 RETURNING *) "
        f"INSERT INTO {name} SELECT * FROM moved",
        lo,
        hi,
    )
    await conn.execute(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ('{lo}') TO ('{hi}')")


async def drop_day(conn: asyncpg.Connection, table: str, day: str) -> int:
    """Drop ``table``'s partition of ``day``; returns the rows it held (0 when it did not exist)."""
    name = partition_name(table, day)
    if await conn.fetchval("SELECT to_regclass($1)", name) is None:
        return 0
    rows = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))
    await conn.execute(f"DROP TABLE {name}")
    return rows
