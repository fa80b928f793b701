"""The shared storage test suite: every test runs against SQLite and PostgreSQL (real files, a real server).

What one ``Store`` must do whichever backend (storage/base.py, docs/storage.md): open and migrate twice
without change, write a batch all or none, name the records it rejects, say "retry" when the server goes away
and succeed once it is back, run write jobs in their own transaction, report health, close twice, roll up and
account usage identically, and keep exactly what retention says to keep. PostgreSQL comes from
tests/fixtures/postgres.py (the machine's server or a private one).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from storage.errors import RecordRejectedError, StoreUnavailableError
from storage.open_store import ServedPostgres, retention_for
from storage.postgres import PostgresStore
from storage.postgres.partitions import existing_days
from storage.records import ErrorRecord, Record
from storage.resources import GpuSample, SystemSample
from storage.retention import RetentionPolicy
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.fixtures.postgres import PgServer
from tests.fixtures.records import mixed_records, rec
from tests.polling import until

Store = SQLiteStore | PostgresStore


@dataclass
class Backend:
    """One backend under test: how to make its store, read its tables, and take it away."""

    name: str
    make: Callable[..., Store]
    target: str  # file path or database URL
    pg: PgServer | None = None
    blocker: sqlite3.Connection | None = None
    stores: list[Store] = field(default_factory=list)

    def store(self, **kw: Any) -> Store:
        s = self.make(**kw)
        self.stores.append(s)
        return s

    async def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of ``table`` without its ``id``, sorted, as plain Python values."""
        if self.pg is None:

            def read() -> list[dict[str, Any]]:
                con = sqlite3.connect(f"file:{self.target}?mode=ro", uri=True, timeout=5.0)
                con.row_factory = sqlite3.Row
                try:
                    return [dict(r) for r in con.execute(f"SELECT * FROM {table}")]
                finally:
                    con.close()

            out = await asyncio.to_thread(read)
        else:
            conn = await asyncpg.connect(self.target, timeout=10)
            try:
                out = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
            finally:
                await conn.close()
        for r in out:
            r.pop("id", None)
        return sorted(out, key=lambda r: tuple(str(v) for v in r.values()))

    async def columns(self) -> dict[str, list[str]]:
        if self.pg is None:
            con = sqlite3.connect(self.target)
            try:
                names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                return {
                    n: [c[1] for c in con.execute(f"PRAGMA table_info({n})")]
                    for n in names
                    if n != "sqlite_sequence"
                }
            finally:
                con.close()
        conn = await asyncpg.connect(self.target, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT c.relname, a.attname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
                "ORDER BY c.relname, a.attnum"
            )
        finally:
            await conn.close()
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r[0], []).append(r[1])
        return out

    async def block(self) -> None:
        """Make writes fail for a reason that passes: SQLite locked by another connection; PostgreSQL
        refusing connections to the database, its sessions terminated."""
        if self.pg is None:
            self.blocker = sqlite3.connect(self.target, isolation_level=None)
            self.blocker.execute("BEGIN EXCLUSIVE")
            return
        name = self.target.rpartition("/")[2]
        await asyncio.to_thread(self.pg.admin, f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        await asyncio.to_thread(
            self.pg.admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )

    async def unblock(self) -> None:
        if self.pg is None:
            assert self.blocker is not None
            self.blocker.execute("ROLLBACK")
            self.blocker.close()
            return
        name = self.target.rpartition("/")[2]
        await asyncio.to_thread(self.pg.admin, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

    # A write job in each dialect: insert a retention_runs row with ``marker`` as its times.
    def insert_job(self, marker: str) -> Callable[[Any], Awaitable[None]]:
        async def sqlite_job(db: Any) -> None:
            await db.execute(
                "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted) VALUES (?, ?, 0, '{}')",
                (marker, marker),
            )

        async def pg_job(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted) VALUES ($1, $2, 0, '{}')",
                marker,
                marker,
            )

        return sqlite_job if self.pg is None else pg_job


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "ollamon.db"
        b = Backend("sqlite", lambda **kw: SQLiteStore(path, busy_timeout_ms=100, **kw), str(path))
    else:
        url = request.getfixturevalue("pg_url")
        server = request.getfixturevalue("pg_server")
        b = Backend("postgres", lambda **kw: PostgresStore(url, command_timeout_s=10, **kw), url, pg=server)
    yield b
    for s in b.stores:
        await s.close()


@pytest.fixture
async def both(tmp_path: Path, pg_url: str, pg_server: PgServer) -> AsyncIterator[tuple[Backend, Backend]]:
    path = tmp_path / "ollamon.db"
    lite = Backend("sqlite", lambda **kw: SQLiteStore(path, **kw), str(path))
    pg = Backend("postgres", lambda **kw: PostgresStore(pg_url, **kw), pg_url, pg=pg_server)
    yield lite, pg
    for s in (*lite.stores, *pg.stores):
        await s.close()


async def test_open_twice_is_idempotent(backend: Backend) -> None:
    first = backend.store()
    await first.open()
    migrations = await backend.rows("_migrations")
    columns = await backend.columns()
    await first.close()
    second = backend.store()
    await second.open()
    assert await backend.rows("_migrations") == migrations
    assert await backend.columns() == columns
    await second.write_batch([rec(1)])
    assert len(await backend.rows("inference_metrics")) == 1


async def test_two_stores_opening_at_once_migrate_once(backend: Backend) -> None:
    # Before storage/migrations.py looked again under BEGIN IMMEDIATE, SQLite failed here now and then
    # ("table inference_metrics already exists"): both read the applied list before either migrated.
    first, second = backend.store(), backend.store()
    await asyncio.gather(first.open(), second.open())  # two instances starting together migrate in turn
    names = [r["name"] for r in await backend.rows("_migrations")]
    assert len(names) == len(set(names))
    await second.write_batch([rec(1)])
    assert len(await backend.rows("inference_metrics")) == 1


async def test_schemas_have_the_same_tables_and_columns(both: tuple[Backend, Backend]) -> None:
    lite, pg = both
    for b in both:
        await b.store().open()
    assert await pg.columns() == await lite.columns()


async def test_write_batch_is_all_or_none(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    bad = ErrorRecord(
        timestamp="2026-11-26T23:07:39.000Z", request_id="x", error_type=None, error_message="m"
    )  # type: ignore[arg-type]
    batch: list[Record] = [rec(1), SystemSample(timestamp="2026-11-26T23:07:39.000Z", cpu_percent=1.0), bad]
    with pytest.raises(RecordRejectedError):
        await store.write_batch(batch)
    for table in ("inference_metrics", "error_metrics", "system_metrics", "rollup_minute", "usage_hour"):
        assert await backend.rows(table) == [], table
    await store.write_batch(batch[:2])
    assert len(await backend.rows("inference_metrics")) == 1
    assert len(await backend.rows("rollup_hour")) == 3  # levels 0, 1 and 2


async def test_rejected_records_are_named_by_index(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    batch: list[Any] = [rec(0), rec(1, model_name=object()), rec(2), object()]
    with pytest.raises(RecordRejectedError) as caught:
        await store.write_batch(batch)
    assert caught.value.indices == (1, 3)
    assert await backend.rows("inference_metrics") == []


async def test_unavailable_while_the_server_is_away_then_the_same_batch_lands(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    await store.write_batch([rec(0)])
    await backend.block()
    try:
        with pytest.raises(StoreUnavailableError):
            await store.write_batch([rec(1), rec(2)])
        # SQLite's reader is never blocked by a writer in WAL mode; PostgreSQL is gone altogether.
        assert await store.health() == ("ok" if backend.pg is None else "down")
    finally:
        await backend.unblock()
    await store.write_batch([rec(1), rec(2)])
    assert [r["request_id"] for r in await backend.rows("inference_metrics")] == ["req-0", "req-1", "req-2"]
    assert await store.health() == "ok"


async def test_execute_write_runs_in_a_transaction_of_its_own(backend: Backend) -> None:
    store = backend.store()
    await store.open()

    async def job(conn: Any) -> str:
        await backend.insert_job("kept")(conn)
        return "done"

    assert await store.execute_write(job) == "done"

    async def failing(conn: Any) -> None:
        await backend.insert_job("rolled back")(conn)
        raise RuntimeError("the job failed")

    with pytest.raises(RuntimeError, match="the job failed"):
        await store.execute_write(failing)
    assert (
        await store.execute_write(lambda c: backend.insert_job("no transaction")(c), transaction=False)
        is None
    )
    assert sorted(r["started_at"] for r in await backend.rows("retention_runs")) == ["kept", "no transaction"]


async def test_health_and_close_twice(backend: Backend) -> None:
    store = backend.store()
    assert await store.health() == "down"  # not open yet
    await store.open()
    assert await store.health() == "ok"
    await store.close()
    await store.close()
    assert await store.health() == "down"
    with pytest.raises(StoreUnavailableError):
        await store.write_batch([rec(0)])


async def test_rollups_and_usage_are_equal_on_both_backends(both: tuple[Backend, Backend]) -> None:
    for b in both:
        store = b.store(store_text=True)
        await store.open()
        for batch in mixed_records():
            await store.write_batch(batch)
    lite, pg = both
    for table in ("rollup_minute", "rollup_hour", "usage_hour", "error_metrics"):
        theirs = await pg.rows(table)
        assert theirs, table
        assert theirs == await lite.rows(table), table
    ours = {r["request_id"]: r for r in await lite.rows("inference_metrics")}
    theirs = {r["request_id"]: r for r in await pg.rows("inference_metrics")}
    assert theirs == ours


async def test_compaction_builds_the_same_day_and_5_minute_rows_on_both_backends(
    both: tuple[Backend, Backend],
) -> None:
    """Retention's compaction (storage/rollup_day.py, one code for both backends) turns the same hours and
    minutes into the same ``rollup_day`` and ``rollup_5m`` rows; a second pass finds nothing stale."""
    now = 1796040000.0  # 2026-11-30T12:00:00Z: 11-26 is a finished day, its minutes older than two days
    recent = [
        rec(1000 + i, f"2026-11-29T10:{i:02d}:30.000Z", model_name=("a", "b")[i % 2]) for i in range(40)
    ]
    results = []
    for b in both:
        store = b.store()
        await store.open()
        for batch in [*mixed_records(), recent]:
            await store.write_batch(batch)
        writer = Writer(store, flush_interval_s=0.01)
        await writer.start()
        try:
            job = retention_for(store, RetentionPolicy(raw_days=400, system_days=400, rollup_days=400))
            results.append(await job.run_once(writer, now=now))  # type: ignore[attr-defined]
            again = await job.run_once(writer, now=now)  # type: ignore[attr-defined]
        finally:
            await writer.stop()
        assert again["error"] is None and again["rollup_days_compacted"] == 0, b.name
    lite, pg = both
    assert [r["rollup_days_compacted"] for r in results] == [2, 2]  # 11-26 and 11-29
    for table in ("rollup_day", "rollup_5m"):
        ours = await lite.rows(table)
        assert ours, table
        assert await pg.rows(table) == ours, table
    assert {r["bucket"] for r in await pg.rows("rollup_5m")} == {1795946400 + 300 * k for k in range(8)}


async def test_retention_keeps_exactly_what_it_should(backend: Backend) -> None:
    store = backend.store(store_text=True)
    await store.open()
    now = 1796041800.0  # 2026-11-30T12:30:00Z
    stamps = [
        "2026-11-26T10:00:00.000Z",
        "2026-11-27T23:59:59.999Z",
        "2026-11-28T11:59:59.999Z",
        "2026-11-28T12:00:00.000Z",  # the raw cutoff (2 days before, floored to the hour): kept
        "2026-11-28T13:00:00.000Z",
        "2026-11-30T12:00:00.000Z",
    ]
    batch: list[Record] = [rec(i, ts, prompt_text=f"p{i}") for i, ts in enumerate(stamps)]
    batch.append(ErrorRecord(timestamp="garbage", request_id=None, error_type="t", error_message="m"))
    batch += [SystemSample(timestamp=ts) for ts in ("2026-11-27T00:00:00.000Z", "2026-11-29T12:29:59.999Z")]
    batch += [GpuSample(timestamp="2026-11-29T12:30:00.001Z", gpu_index=0)]
    await store.write_batch(batch)
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()
    try:
        job = retention_for(store, RetentionPolicy(raw_days=2, system_days=1, rollup_days=400, batch_rows=2))
        dry = await job.run_once(writer, dry_run=True, now=now)  # type: ignore[attr-defined]
        assert len(await backend.rows("inference_metrics")) == len(stamps)  # a dry run only counts
        result = await job.run_once(writer, now=now)  # type: ignore[attr-defined]
    finally:
        await writer.stop()
    assert result["error"] is None
    kept = stamps[3:]
    assert sorted(r["timestamp"] for r in await backend.rows("inference_metrics")) == kept
    assert sorted(r["timestamp"] for r in await backend.rows("request_text")) == kept
    assert [r["timestamp"] for r in await backend.rows("error_metrics")] == ["garbage"]
    assert await backend.rows("system_metrics") == []
    assert len(await backend.rows("gpu_metrics")) == 1
    assert result["deleted"]["inference_metrics"] == dry["deleted"]["inference_metrics"] == 3
    assert result["deleted"]["system_metrics"] == dry["deleted"]["system_metrics"] == 2
    minutes = [r["bucket"] for r in await backend.rows("rollup_minute")]
    assert minutes and min(minutes) >= 1795867200  # 2026-11-28T12:00Z
    assert 1795687200 in {
        r["bucket"] for r in await backend.rows("rollup_hour")
    }  # 11-26 10:00: 400 days kept
    if backend.pg is not None:  # whole days went as partitions, not as row deletes
        assert result["partitions_dropped"]["inference_metrics"] == 2
        conn = await asyncpg.connect(backend.target)
        try:
            days = await existing_days(conn, "inference_metrics")
        finally:
            await conn.close()
        assert not days & {"2026-11-26", "2026-11-27"} and "2026-11-28" in days
    # Late records of a dropped day are still stored (the partition comes back), and counted.
    await store.write_batch([rec(99, "2026-11-26T10:00:00.000Z")])
    assert len(await backend.rows("inference_metrics")) == len(kept) + 1


async def test_the_writer_drains_everything_into_the_store(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    writer = Writer(store, batch_rows=50, flush_interval_s=0.01)
    await writer.start()
    for i in range(500):
        assert writer.submit(rec(i, f"2026-11-{26 + i % 3}T10:00:{i % 60:02d}.000Z"))
    await writer.stop()
    assert len(await backend.rows("inference_metrics")) == 500
    level2 = [r for r in await backend.rows("rollup_hour") if r["level"] == 2]
    assert sum(r["requests"] for r in level2) == 500


async def test_odd_values_are_kept_as_sqlite_keeps_them(backend: Backend) -> None:
    """Values a strict column cannot hold as they are: the record is kept, what does not fit is moved."""
    store = backend.store(store_text=True)
    await store.open()
    odd = [
        rec(0, seed=10**30),  # beyond 64 bits: NULL, its text in metadata.out_of_range
        rec(1, metadata={"x": object()}),  # not JSON: replaced by metadata_error
        rec(
            2, prompt_tokens=3.0, response_time_ms=7
        ),  # a whole float in an integer column, an int in a real one
        rec(3, user_agent="nul\x00inside", prompt_text="p\x00", metadata={"s": "a\x00b"}),
    ]
    await store.write_batch(odd)
    rows = {r["request_id"]: r for r in await backend.rows("inference_metrics")}
    assert rows["req-0"]["seed"] is None and '"out_of_range":{"seed":"1' in rows["req-0"]["metadata"]
    assert "metadata_error" in rows["req-1"]["metadata"]
    assert rows["req-2"]["prompt_tokens"] == 3 and rows["req-2"]["response_time_ms"] == 7.0
    # JSON escapes NUL, so JSON text is identical; plain text cannot hold NUL in PostgreSQL: U+FFFD.
    assert rows["req-3"]["metadata"] == '{"s":"a\\u0000b"}'
    nul = "\x00" if backend.pg is None else "\ufffd"
    assert rows["req-3"]["user_agent"] == f"nul{nul}inside"
    assert [r["prompt_text"] for r in await backend.rows("request_text")] == [f"p{nul}"]


async def test_a_repeated_request_id_replaces_its_text(backend: Backend) -> None:
    store = backend.store(store_text=True)
    await store.open()
    await store.write_batch([rec(1, prompt_text="first"), rec(1, prompt_text="second")])
    await store.write_batch([rec(1, "2026-11-27T10:00:00.000Z", prompt_text="third")])
    assert [r["prompt_text"] for r in await backend.rows("request_text")] == ["third"]


async def test_the_sql_histogram_merge_equals_merge_blobs(pg_url: str) -> None:
    """``ollamon_hist_merge`` (for SQL-side reads and compaction) is byte for byte storage.histogram's."""
    import random

    from storage.histogram import counts_of, encode, merge_blobs

    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
    rnd = random.Random(7)
    cases: list[tuple[bytes | None, bytes | None]] = [(None, None), (b"", None), (None, encode({3: 1}))]
    for _ in range(30):
        a = encode(counts_of(rnd.lognormvariate(3, 2) for _ in range(rnd.randint(1, 300))))
        b = encode(counts_of(rnd.lognormvariate(5, 1) for _ in range(rnd.randint(1, 300))))
        cases.append((a, b))
    conn = await asyncpg.connect(pg_url)
    try:
        for a, b in cases:
            assert await conn.fetchval("SELECT ollamon_hist_merge($1, $2)", a, b) == merge_blobs(a, b)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", SQLiteStore),
        ("sqlite:{tmp}/x.db", SQLiteStore),
        ("postgresql://u@127.0.0.1:1/db", ServedPostgres),
    ],
)
def test_store_for_picks_the_backend_from_the_url(tmp_path: Path, url: str, expected: type) -> None:
    from proxy.config import load_config
    from storage.open_store import store_for

    env = {"OLLAMON_DB": str(tmp_path / "default.db")}
    if url:
        env["OLLAMON_DB_URL"] = url.format(tmp=tmp_path)
    (tmp_path / "c.yaml").write_text("")
    config = load_config(tmp_path / "c.yaml", env=env)
    store = store_for(config.storage)
    assert type(store) is expected
    if isinstance(store, ServedPostgres):  # a PostgresStore with its reads, as SQLite's store has
        assert store.reads.postgres and store.path == "postgresql://u@127.0.0.1:1/db"
    if url.startswith("sqlite:"):
        assert isinstance(store, SQLiteStore) and store.path == tmp_path / "x.db"
    if not url:
        assert isinstance(store, SQLiteStore) and store.path == tmp_path / "default.db"


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite:", "postgresql:/nohost", "/just/a/path"])
def test_a_bad_storage_url_names_the_key(url: str, tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.errors import ConfigError

    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"OLLAMON_DB_URL.*storage\.url.*postgresql://"):
        load_config(tmp_path / "c.yaml", env={"OLLAMON_DB_URL": url})


async def test_the_writer_rides_out_an_outage_without_losing_a_record(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    writer = Writer(store, batch_rows=20, flush_interval_s=0.01, backoff_initial_s=0.05, backoff_max_s=0.2)
    await writer.start()
    try:
        for i in range(50):
            writer.submit(rec(i))
        await until(lambda: writer.stats()["written"] == 50, within=60, what="the first records written")
        await backend.block()
        try:
            for i in range(50, 120):
                writer.submit(rec(i))
            await until(lambda: writer.stats()["failed_writes"] > 0, within=60, what="a failed write")
        finally:
            await backend.unblock()
        await until(lambda: writer.stats()["written"] == 120, within=60, what="every record written")
    finally:
        await writer.stop()
    assert writer.stats()["lost"] == 0 and writer.stats()["rejected"] == 0
    assert len(await backend.rows("inference_metrics")) == 120
    level2 = [r for r in await backend.rows("rollup_minute") if r["level"] == 2]
    assert sum(r["requests"] for r in level2) == 120  # a retried batch is rolled up once


async def test_an_unreachable_database_fails_open_with_the_password_hidden(pg_url: str) -> None:
    from storage.errors import StoreOpenError
    from tests.fixtures.ports import free_port

    store = PostgresStore(f"postgresql://u:s3cret@127.0.0.1:{free_port()}/db")
    with pytest.raises(StoreOpenError, match=r"u:\*\*\*@127\.0\.0\.1.*server answers") as caught:
        await store.open()
    assert "s3cret" not in str(caught.value)
    missing = PostgresStore(pg_url + "_missing")
    with pytest.raises(StoreOpenError, match="does not exist"):
        await missing.open()
    await store.close()
    await missing.close()


async def test_two_instances_writing_at_once_lose_no_histogram(both: tuple[Backend, Backend]) -> None:
    """Two PostgreSQL stores (two proxy instances) add into the same rollup rows concurrently; their rows must
    equal those of one SQLite store given every record: histograms merged under the rollup lock, none lost."""
    lite, pg = both
    batches = mixed_records()
    one = lite.store()
    await one.open()
    for batch in batches:
        await one.write_batch(batch)
    a, b = pg.store(), pg.store()
    await asyncio.gather(a.open(), b.open())

    async def instance(store: Store, parts: list[list[Record]]) -> None:
        for batch in parts:
            for i in range(0, len(batch), 5):  # small batches, so the two interleave often
                await store.write_batch(batch[i : i + 5])

    await asyncio.gather(instance(a, batches[::2]), instance(b, batches[1::2]))
    for table in ("rollup_minute", "rollup_hour", "usage_hour"):
        ours, theirs = await lite.rows(table), await pg.rows(table)
        assert len(theirs) == len(ours), table
        for x, y in zip(ours, theirs, strict=True):
            assert x.keys() == y.keys(), table
            for k, v in x.items():  # float sums may differ in the last bits: another order of additions
                assert y[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else v), (table, k)


def test_serve_on_an_unreachable_postgresql_exits_naming_it(tmp_path: Path) -> None:
    """``ollamon serve`` with ``OLLAMON_DB_URL`` pointing at no server exits 1 with one line naming the database
    (its password hidden), creates no SQLite file beside it and prints no traceback."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OLLAMON_DB_URL": "postgresql://ollamon:secret@127.0.0.1:1/x"}
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "x.db")],
        cwd=root, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot open the PostgreSQL database at 'postgresql://ollamon:***@127.0.0.1:1/x'" in proc.stderr
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr
    assert not (tmp_path / "x.db").exists()
