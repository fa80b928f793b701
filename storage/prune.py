"""``ollamon db prune``: one retention run now, on a SQLite file or a PostgreSQL database, through a writer of
its own (the CLI is not the running proxy, but writes only through a writer as the proxy does).

Here rather than in storage/retention.py because it needs both stores, and the stores' modules import the
retention modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite

from storage.postgres.retention import PgRetention
from storage.postgres.store import PostgresStore
from storage.reads import is_postgres_url
from storage.retention import Retention, RetentionPolicy
from storage.sqlite import SQLiteStore
from storage.writer import Writer

__all__ = ["prune"]


async def prune(where: Path | str, policy: RetentionPolicy, *, dry_run: bool, vacuum: bool) -> dict[str, Any]:
    """One retention run on ``where`` (a file path or a ``postgresql://`` URL). With ``vacuum`` on SQLite,
    first rewrite the file with incremental auto-vacuum; PostgreSQL drops whole partitions, which returns
    their space at once, so ``vacuum`` changes nothing there."""
    store: SQLiteStore | PostgresStore = (
        PostgresStore(str(where)) if is_postgres_url(where) else SQLiteStore(where)
    )
    await store.open()
    writer = Writer(store, flush_interval_s=0.01)
    try:
        await writer.start()
        if isinstance(store, PostgresStore):
            return await PgRetention(policy, store).run_once(writer, dry_run=dry_run)
        if vacuum and not dry_run:

            async def rewrite(db: aiosqlite.Connection) -> None:
                await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                await db.execute("VACUUM")

            await writer.execute_write(rewrite, transaction=False)
        return await Retention(policy, where).run_once(writer, dry_run=dry_run)
    finally:
        await writer.stop()
        await store.close()
