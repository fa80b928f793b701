"""Every named read gives the same answer on PostgreSQL as on SQLite, for the same history.

The reads are written once (storage/postgres/sync_conn.py says how they run on PostgreSQL); this suite is what
keeps that honest: one varied history (tests/fixtures/records.py: models, endpoints, failures, cancels, loads,
missing metrics, conversations, upstreams, text, errors, content analyses, system and GPU samples) goes into a
SQLite file and a PostgreSQL database, each read runs on both, and the answers must be equal (floats to 1e-9
relative: sums may add in another order).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from storage.alerts import record_delivery, save_alert
from storage.browse import RequestQuery
from storage.content import register_content
from storage.errors import StoreReadError
from storage.postgres import PostgresStore
from storage.postgres.sync_conn import PgSource
from storage.queries import Filters, QueryError
from storage.reads import Reads
from storage.sql_compat import translate
from storage.sqlite import SQLiteStore
from storage.usage_reads import UsageReads
from storage.writer import Writer
from tests.fixtures.compare import same
from tests.fixtures.records import mixed_records, samples


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


SINCE, UNTIL = _epoch("2026-11-26T21:30:00Z"), _epoch("2026-11-27T00:10:00Z")
HOUR = (_epoch("2026-11-26T22:00:00Z"), _epoch("2026-11-26T23:00:00Z"))


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[tuple[UsageReads, UsageReads]]:
    path = tmp_path / "ollamon.db"
    stores: list[SQLiteStore | PostgresStore] = [
        SQLiteStore(path, store_text=True),
        PostgresStore(pg_url, store_text=True),
    ]
    for s in stores:
        register_content(s)  # type: ignore[arg-type]  # PostgreSQL's store writes ContentRecord itself
        await s.open()
        for batch in mixed_records(rich=True):
            await s.write_batch(batch)
        await s.write_batch(samples())
        await _alerts(s)
    yield UsageReads(path), UsageReads(pg_url)
    for s in stores:
        await s.close()
    PgSource.for_url(pg_url).close()


async def _alerts(store: SQLiteStore | PostgresStore) -> None:
    """Two alerts through the writer's write jobs (storage/alerts.py, written once for both backends)."""
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()
    try:
        for n, state in enumerate(("firing", "resolved")):
            fields: dict[str, Any] = dict(
                rule=f"slow-{n}",
                fingerprint=f"fp{n}",
                labels={"model": "m", "n": n},
                severity="warning",
                state="pending",
                value=1.5 + n,
                threshold=1.0,
                message="slow",
                started_at="2026-11-26T22:00:00.000Z",
                fired_at=None,
                resolved_at=None,
                last_notified_at=None,
                announced_at=None,
                notification_count=0,
            )
            alert_id = await save_alert(
                writer, fields, None, [("inactive", "pending")], "2026-11-26T22:00:00.000Z"
            )
            fields.update(
                state="firing", fired_at="2026-11-26T22:01:00.000Z", announced_at="2026-11-26T22:01:00.000Z"
            )
            if state == "resolved":
                fields.update(state="resolved", resolved_at="2026-11-26T22:09:00.000Z")
            await save_alert(writer, fields, alert_id, [("pending", state)], "2026-11-26T22:01:00.000Z")
            await record_delivery(writer, alert_id, None if n else "HTTP 500", "2026-11-26T22:01:01.000Z")
    finally:
        await writer.stop()


READS: dict[str, Callable[[UsageReads], Any]] = {
    "summary": lambda r: r.summary(SINCE, UNTIL),
    "summary exact": lambda r: r.summary(SINCE, UNTIL, exact=True),
    "summary auto, whole hour": lambda r: r.summary(*HOUR),
    "summary by upstream": lambda r: r.summary(SINCE, UNTIL, by="upstream"),
    "summary exact, whole hour (guided)": lambda r: r.summary(*HOUR, exact=True),
    "summary rollups, whole hour": lambda r: r.summary(*HOUR, exact=False),
    "summary overall only": lambda r: r.summary(SINCE, UNTIL, per_model=False),
    "summary model": lambda r: r.summary(SINCE, UNTIL, Filters(model="qwen3:0.6b")),
    "summary endpoint": lambda r: r.summary(SINCE, UNTIL, Filters(endpoint="/api/generate")),
    "summary user": lambda r: r.summary(SINCE, UNTIL, Filters(user="u1")),
    "summary upstream": lambda r: r.summary(SINCE, UNTIL, Filters(upstream="gpu-b")),
    "timeseries 5m": lambda r: r.timeseries(
        SINCE, UNTIL, "5m", ["requests", "ttft_ms_p50", "tokens_per_second_avg"]
    ),
    "timeseries 1h exact": lambda r: r.timeseries(
        SINCE, UNTIL, "1h", ["requests", "ttft_ms_p95"], exact=True
    ),
    "timeseries 1m model": lambda r: r.timeseries(*HOUR, "1m", ["error_rate"], Filters(model="llama3.2:1b")),
    "recent requests": lambda r: r.recent_requests(RequestQuery(limit=500)),
    "recent requests, failed, page 2": lambda r: r.recent_requests(
        RequestQuery(success=False, limit=5, cursor=("2026-11-26T23:00:00.000Z", "req-9"))
    ),
    "recent requests filtered": lambda r: r.recent_requests(
        RequestQuery(filters=Filters(model="qwen3:0.6b", upstream="gpu-a"), since=HOUR[0], until=HOUR[1])
    ),
    "request detail": lambda r: r.request_detail("req-5"),
    "request detail, unknown": lambda r: r.request_detail("nope"),
    "errors": lambda r: r.errors(SINCE, UNTIL),
    "errors of a model": lambda r: r.errors(SINCE, UNTIL, model="llama3.2:1b", limit=3),
    "conversations": lambda r: r.conversations(SINCE, UNTIL),
    "conversations of a model": lambda r: r.conversations(SINCE, UNTIL, model="qwen3:0.6b", limit=2),
    "conversation": lambda r: r.conversation("c1"),
    "content summary": lambda r: r.content_summary(SINCE, UNTIL),
    "content summary by model": lambda r: r.content_summary(SINCE, UNTIL, "model"),
    "system history": lambda r: r.system_history("2026-11-26T22:10:00.000Z"),
    "latest system": lambda r: r.latest_system(),
    "alerts": lambda r: r.alerts(),
    "open alerts": lambda r: r.open_alerts(),
    "alert": lambda r: r.alert(2),
    "resolved alerts": lambda r: r.alerts("resolved", 5),
    "last announced": lambda r: r.last_announced(),
    "requests since": lambda r: r.requests_since("2026-11-26T22:30:00.000Z"),
    "usage by key": lambda r: r.usage(SINCE, UNTIL, "key"),
    "usage by team, whole hours": lambda r: r.usage(HOUR[0], HOUR[1] + 3600, "team"),
    "usage by user": lambda r: r.usage(SINCE, UNTIL, "user", limit=2),
    "used since": lambda r: r.used_since(SINCE, UNTIL, "team"),
}


@pytest.mark.parametrize("name", list(READS))
async def test_the_read_answers_the_same_on_both_backends(
    name: str, pair: tuple[UsageReads, UsageReads]
) -> None:
    lite, pg = pair
    ours, theirs = READS[name](lite), READS[name](pg)
    if name != "request detail, unknown":
        assert ours, f"{name}: SQLite answered nothing, so the comparison proves nothing"
    same(theirs, ours, name)


@pytest.mark.parametrize("table", ["inference_metrics", "error_metrics", "system_metrics", "gpu_metrics"])
async def test_exports_stream_the_same_rows(table: str, pair: tuple[UsageReads, UsageReads]) -> None:
    out = []
    for reads in pair:
        with reads.export_rows(table, SINCE, UNTIL) as rows:
            names = list(next(rows))
            got = [dict(zip(names, r, strict=True)) for r in rows]
        for g in got:
            g.pop("id", None)
        out.append(sorted(got, key=lambda r: (r["timestamp"], str(r.get("request_id", r.get("gpu_index"))))))
    assert out[0], table
    same(out[1], out[0], table)


async def test_a_bad_table_or_bucket_is_the_same_error(pair: tuple[UsageReads, UsageReads]) -> None:
    for reads in pair:
        with pytest.raises(QueryError), reads.export_rows("sqlite_master", SINCE, UNTIL) as rows:
            list(rows)
        with pytest.raises(QueryError):
            reads.timeseries(SINCE, UNTIL, "7m", ["requests"])


async def test_db_stats_counts_the_rows_on_postgresql(pair: tuple[UsageReads, UsageReads]) -> None:
    lite, pg = pair
    ours, theirs = lite.db_stats(), pg.db_stats()
    for table in ("inference_metrics", "error_metrics", "system_metrics", "gpu_metrics", "request_text"):
        assert theirs["tables"][table] == ours["tables"][table] > 0, table
    assert theirs["records"] == ours["records"]
    assert theirs["database_bytes"] > 0
    assert "password" not in str(theirs["path"])


def test_an_unreachable_database_is_a_read_error_without_the_password() -> None:
    from tests.fixtures.ports import free_port

    reads = Reads(f"postgresql://ollamon:s3cret@127.0.0.1:{free_port()}/none")
    with pytest.raises(StoreReadError) as caught:
        reads.summary(SINCE, UNTIL)
    assert "s3cret" not in str(caught.value) and "cannot connect" in str(caught.value)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT ? , '?' , \"a?\" -- what?\n, ?", "SELECT $1 , '?' , \"a?\" -- what?\n, $2"),
        (
            "SELECT CAST(x AS REAL), CAST(y AS integer) FROM t WHERE a = 'it''s ?' AND b = ?",
            "SELECT CAST(x AS DOUBLE PRECISION), CAST(y AS BIGINT) FROM t WHERE a = 'it''s ?' AND b = $1",
        ),
        ("SELECT 'AS REAL)'", "SELECT 'AS REAL)'"),
    ],
)
def test_translation_touches_only_placeholders_and_casts(sql: str, expected: str) -> None:
    assert translate(sql) == expected
