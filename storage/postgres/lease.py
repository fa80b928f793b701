"""Leases in PostgreSQL: one row per lease name, taken or renewed by one atomic statement.

The fleet always shares its PostgreSQL database (Redis is optional), so the lease lives there. A row
``(name, holder, epoch, expires_at)`` is taken by an ``INSERT .. ON CONFLICT DO UPDATE .. WHERE`` that
succeeds only when the lease is free, expired or already ours; the row lock the statement takes makes two
contenders take turns, so exactly one wins. Expiry uses the server's clock (``now()``), never the
instances', so their clocks do not matter. ``epoch`` increments with every new holder: a fencing token.

Why not ``pg_try_advisory_lock``: a session lock is kept by a holder whose connection stays up while its
process hangs, and is lost by a healthy holder on a network blip; a row with a TTL is lost by a hung holder
within ``ttl_s`` and survives a blip shorter than that.

Why a connection of its own and not the writer: a renewal must not wait behind a batch in the writer's
queue (a lease that expires because storage is busy would hand the alerts over for nothing). The statement
touches one small row of a table that is no part of the recorded data.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.lease import Grant, LeaseKeeper, instance_id
from storage.postgres.errors import redact

__all__ = ["CREATE_TABLE", "MAINTENANCE_TTL_S", "PgLeaseBackend", "maintenance_lease", "pg_lease"]

logger = logging.getLogger(__name__)

# Retention runs hourly: a minute without a maintenance holder after one dies costs nothing.
MAINTENANCE_TTL_S = 60.0

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS ollamon_leases ("
    "name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL, "
    "acquired_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL)"
)

# Free, expired or ours: take it (a new epoch unless we are renewing an unexpired tenure of ours).
_ACQUIRE = """
INSERT INTO ollamon_leases AS l (name, holder, epoch, acquired_at, expires_at)
VALUES ($1, $2, 1, now(), now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET
    holder = EXCLUDED.holder,
    epoch = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.epoch ELSE l.epoch + 1 END,
    acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now()
                       THEN l.acquired_at ELSE now() END,
    expires_at = EXCLUDED.expires_at
WHERE l.holder = EXCLUDED.holder OR l.expires_at <= now()
RETURNING epoch
"""
_CURRENT = "SELECT holder, epoch, expires_at > now() AS live FROM ollamon_leases WHERE name = $1"
_RELEASE = (
    "UPDATE ollamon_leases SET expires_at = now() WHERE name = $1 AND holder = $2 AND expires_at > now()"
)


class PgLeaseBackend:
    """``LeaseBackend`` on one connection of its own to ``url``, opened (and the table created) on first use
    and opened again after it breaks."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.where = redact(url)
        self.connect_timeout_s = connect_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        conn = await asyncpg.connect(self.url, timeout=self.connect_timeout_s)
        try:
            try:
                await conn.execute(CREATE_TABLE)
            except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
                pass  # two instances created it at once: it exists now
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Grant:
        async with self._lock:
            try:
                conn = await self._connection()
                epoch = await conn.fetchval(_ACQUIRE, name, holder, float(ttl_s))
                if epoch is not None:
                    return Grant(True, holder, int(epoch))
                row = await conn.fetchrow(_CURRENT, name)
            except BaseException:
                await self._drop()  # a statement cut short leaves the connection unusable
                raise
        if row is None:
            return Grant(False, None, 0)
        return Grant(False, row["holder"] if row["live"] else None, int(row["epoch"]))

    async def release(self, name: str, holder: str) -> None:
        async with self._lock:
            try:
                conn = await self._connection()
                await conn.execute(_RELEASE, name, holder)
            except BaseException:
                await self._drop()
                raise

    async def holders(self) -> dict[str, tuple[str | None, int]]:
        """Every lease: its live holder (None when expired or released) and epoch (health, tests)."""
        async with self._lock:
            conn = await self._connection()
            rows = await conn.fetch(
                "SELECT name, holder, epoch, expires_at > now() AS live FROM ollamon_leases"
            )
        return {r["name"]: (r["holder"] if r["live"] else None, int(r["epoch"])) for r in rows}

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2.0)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.debug("%s: closing the lease connection: %s", self.where, exc)
            conn.terminate()


def pg_lease(
    url: str, name: str, *, ttl_s: float, renew_s: float | None = None, instance: str | None = None
) -> LeaseKeeper:
    """Lease ``name`` in the database at ``url`` for this process, named after ``instance`` (``start()`` it;
    ``stop()`` releases it)."""
    return LeaseKeeper(PgLeaseBackend(url), name, ttl_s=ttl_s, renew_s=renew_s, holder=instance_id(instance))


def maintenance_lease(url: str, instance: str | None = None) -> LeaseKeeper:
    """The fleet's ``maintenance`` lease (retention, compaction: one instance at a time)."""
    return pg_lease(url, "maintenance", ttl_s=MAINTENANCE_TTL_S, instance=instance)
