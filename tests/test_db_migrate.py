"""``ollamon db migrate``: a real SQLite file (written by SQLiteStore) copied into a real PostgreSQL database.

What must hold: every table arrives (raw rows equal to what a PostgresStore given the same records holds,
rollups and usage equal), an interrupted migration resumes with no row twice and none missing, migrating into
a database live instances already write to double counts nothing, alert transitions keep pointing at their
alert, and the CLI exits 0 / non-zero with messages that name the bad argument and hide the password.
"""

from __future__ import annotations

import asyncio
import io
import math
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.cli.db_migrate import Bar
from storage.alerts import save_alert
from storage.api_keys import insert_key
from storage.content import ContentRecord, register_content
from storage.postgres import PostgresStore
from storage.postgres.from_sqlite import PLANS, SKIPPED, MigrateError, TableState, migrate
from storage.records import ErrorRecord, InferenceRecord, Record
from storage.resources import GpuSample, ModelEvent, ModelInfo, SystemSample
from storage.sqlite import SQLiteStore
from tests.fixtures.postgres import PgServer

ROOT = Path(__file__).resolve().parent.parent
RAW = ("inference_metrics", "error_metrics", "request_text", "system_metrics", "gpu_metrics", "model_events")
ROLLUPS = ("rollup_minute", "rollup_hour", "usage_hour")


class Killed(Exception):
    """Raised from the chunk callback: the process "dies" between two chunks."""


@pytest.fixture
def pg_url2(pg_server: PgServer) -> Iterator[str]:
    """A second fresh database (the "direct" twin the migrated one is compared with)."""
    name = f"ollamon_test_{uuid.uuid4().hex[:12]}"
    pg_server.admin(f"CREATE DATABASE {name}")
    try:
        yield pg_server.url_for(name)
    finally:
        pg_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def batches(n: int, seed: int = 0, day: int = 26) -> list[list[Record]]:
    """``n`` records in batches of 50 over three days: models, endpoints, failures with error rows, text
    (one with a NUL, which PostgreSQL cannot hold), samples, model events, content analyses."""
    out: list[list[Record]] = []
    batch: list[Record] = []
    for i in range(n):
        k = i + seed
        ts = f"2026-11-{day + k % 3:02d}T{k % 24:02d}:{k * 7 % 60:02d}:{k % 60:02d}.{k % 1000:03d}Z"
        failed = k % 6 == 0
        batch.append(
            InferenceRecord(
                timestamp=ts, request_id=f"r{seed}-{i}", model_name=("llama3.2:1b", "qwen3:0.6b", None)[k % 3],
                endpoint=("/api/chat", "/api/generate")[k % 2], success=not failed, cancelled=k % 10 == 0,
                prompt_tokens=k % 50, completion_tokens=k % 70, response_time_ms=50.0 + k * 1.5,
                ttft_ms=None if k % 4 == 0 else 5.0 + k * 0.25, itl_mean_ms=k * 0.125, tokens_per_second=30.5,
                energy_j=None if k % 2 else k * 0.5, api_key_id=("k1", None)[k % 2], team=("red", None)[k % 2],
                user_id=f"u{k % 4}", status_code=500 if failed else 200, cost_usd=k * 0.25,
                metadata={"k": k, "nested": [1, {"x": None}]}, stop=["\n"],
                prompt_text=f"prompt {k}" + ("\x00" if k == 5 else ""), response_text=f"answer {k}",
                error=ErrorRecord(timestamp=ts, request_id=f"r{seed}-{i}", error_type="upstream",
                                  error_message=f"boom {k}") if failed else None,
            )
        )  # fmt: skip
        if k % 5 == 0:
            batch.append(SystemSample(timestamp=ts, cpu_percent=k % 100 + 0.5, extra={"k": k}))
            batch.append(GpuSample(timestamp=ts, gpu_index=k % 2, power_w=100.0 + k, processes=[{"pid": k}]))
        if k % 17 == 0:
            batch.append(ModelEvent(timestamp=ts, model_name="llama3.2:1b", event="load", detail={"k": k}))
            batch.append(ContentRecord(request_id=f"r{seed}-{i}", timestamp=ts, analyzed_at=ts, status="ok",
                                       prompt_pii={"email": k % 3}, categories=["x"], toxicity=0.25))  # fmt: skip
        if len(batch) >= 50:
            out.append(batch)
            batch = []
    batch.append(ModelInfo(model_name="llama3.2:1b", updated_at=f"2026-11-{day}T00:00:0{seed % 10}Z",
                           families=["llama"], installed=True, loaded=False, first_seen="2026-11-01T00:00:00Z"))  # fmt: skip
    out.append(batch)
    return out


async def fill_sqlite(path: Path, records: list[list[Record]], alerts: int = 3) -> None:
    store = SQLiteStore(path, store_text=True)
    await store.open()
    register_content(store)
    try:
        for b in records:
            await store.write_batch(b)
        for a in range(alerts):  # an alert, then transitions that must keep pointing at it
            fields: dict[str, Any] = dict(
                rule=f"rule{a}", fingerprint=f"fp{a}", labels={"model": "m"}, severity="warning",
                state="pending", value=1.0 + a, threshold=0.5, message=f"alert {a}",
                started_at="2026-11-26T00:00:00Z", fired_at=None, resolved_at=None, last_notified_at=None,
                announced_at=None, notification_count=0,
            )  # fmt: skip
            aid = await save_alert(store, fields, None, [("inactive", "pending")], "2026-11-26T00:00:00Z")
            fields["state"] = "firing"
            await save_alert(store, fields, aid, [("pending", "firing")], "2026-11-26T00:01:00Z")
    finally:
        await store.close()
    key = dict(id="key1", hash="h1", prefix="olm_1", name="ci", owner=None, team="red", models=["m"], rpm=5,
               tpm=0, concurrency=0, admin=False, expires_at=None, revoked_at=None, created_at="2026-11-01T00:00:00Z")  # fmt: skip
    await asyncio.to_thread(insert_key, path, key)


async def fill_pg(url: str, records: list[list[Record]]) -> None:
    store = PostgresStore(url, store_text=True)
    await store.open()
    try:
        for b in records:
            await store.write_batch(b)
    finally:
        await store.close()


def _norm(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


async def pg_rows(url: str, table: str, *, keep_id: bool = False) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
    finally:
        await conn.close()
    for r in rows:
        if not keep_id:
            r.pop("id", None)
    return sorted((tuple(_norm(v) for v in r.values()) for r in rows), key=repr)


def lite_rows(path: Path, table: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    finally:
        con.close()


async def assert_same(migrated: str, direct: str, tables: tuple[str, ...] = (*RAW, *ROLLUPS)) -> None:
    for table in (*tables, "model_info", "content_analysis"):
        ours, theirs = await pg_rows(migrated, table), await pg_rows(direct, table)
        assert ours, table
        assert ours == theirs, table


async def assert_alerts_like_sqlite(url: str, path: Path) -> None:
    """Alerts and transitions equal SQLite's, a transition's alert found by its content, not its id."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        alerts = {r["id"]: r for r in map(dict, await conn.fetch("SELECT * FROM alerts"))}
        trans = [dict(r) for r in await conn.fetch("SELECT * FROM alert_transitions ORDER BY id")]
        keys = [dict(r) for r in await conn.fetch("SELECT * FROM api_keys")]
    finally:
        await conn.close()
    lite_alerts = {r["id"]: r for r in lite_rows(path, "alerts")}
    strip = lambda r: {k: v for k, v in r.items() if k != "id"}  # noqa: E731
    assert sorted(map(repr, map(strip, alerts.values()))) == sorted(
        map(repr, map(strip, lite_alerts.values()))
    )
    ours = [(alerts[t["alert_id"]]["rule"], t["at"], t["from_state"], t["to_state"]) for t in trans]
    theirs = [
        (lite_alerts[t["alert_id"]]["rule"], t["at"], t["from_state"], t["to_state"])
        for t in lite_rows(path, "alert_transitions")
    ]
    assert ours == theirs and len(ours) == 6
    assert keys == lite_rows(path, "api_keys")


async def test_every_sqlite_table_has_a_plan(tmp_path: Path, pg_url: str) -> None:
    # A table added later to SQLite without a line here would silently not move: fail instead.
    await fill_sqlite(tmp_path / "a.db", [], alerts=0)
    tables = {r["name"] for r in lite_rows(tmp_path / "a.db", "sqlite_master") if r["type"] == "table"}
    assert tables - SKIPPED == set(PLANS)


async def test_migrated_database_equals_one_written_directly(
    tmp_path: Path, pg_url: str, pg_url2: str
) -> None:
    path = tmp_path / "ollamon.db"
    records = batches(400)
    await fill_sqlite(path, records)
    await fill_pg(pg_url2, records)
    seen: list[tuple[str, int, int]] = []
    result = await migrate(path, pg_url, chunk=37, on_chunk=lambda s: seen.append((s.table, s.done, s.total)))
    await assert_same(pg_url, pg_url2)
    await assert_alerts_like_sqlite(pg_url, path)
    assert not result.stopped and result.skipped == []
    assert result.tables["inference_metrics"].copied == 400
    assert ("inference_metrics", 37, 400) in seen and ("inference_metrics", 400, 400) in seen
    # A second run copies nothing new and changes nothing (rollups are not added twice).
    again = await migrate(path, pg_url, chunk=37)
    assert sum(t.copied for name, t in again.tables.items() if PLANS[name] not in ("keyed", "alerts")) == 0
    await assert_same(pg_url, pg_url2)
    await assert_alerts_like_sqlite(pg_url, path)


async def test_an_interrupted_migration_resumes_without_gaps_or_doubles(
    tmp_path: Path, pg_url: str, pg_url2: str
) -> None:
    path = tmp_path / "ollamon.db"
    records = batches(300)
    await fill_sqlite(path, records)
    await fill_pg(pg_url2, records)
    for stop_after in (3, 5, 4, 9, 2):  # each run dies after a few chunks, in a different table each time
        chunks = 0

        def boom(s: TableState, limit: int = stop_after) -> None:
            nonlocal chunks
            chunks += s.copied > 0 and not s.finished
            if chunks >= limit:
                raise Killed  # as a kill between two chunks: the last one committed

        with pytest.raises(Killed):
            await migrate(path, pg_url, chunk=23, on_chunk=boom)
    stopped = await migrate(path, pg_url, chunk=23, should_stop=lambda: True)
    assert stopped.stopped and stopped.copied == 23
    await migrate(path, pg_url, chunk=23)
    await assert_same(pg_url, pg_url2)
    await assert_alerts_like_sqlite(pg_url, path)
    conn = await asyncpg.connect(pg_url)
    try:
        progress = {r["tbl"]: r["rows"] for r in await conn.fetch("SELECT tbl, rows FROM _migrate_progress")}
    finally:
        await conn.close()
    assert progress["inference_metrics"] == 300


async def test_migrating_into_a_live_database_double_counts_nothing(
    tmp_path: Path, pg_url: str, pg_url2: str
) -> None:
    path = tmp_path / "ollamon.db"
    history, live = batches(250), batches(150, seed=7)  # same days, hours and models: the rollups overlap
    await fill_sqlite(path, history)
    await fill_pg(pg_url, live)  # the instances already on PostgreSQL
    await fill_pg(pg_url2, live + history)  # what one database given everything holds
    await migrate(path, pg_url, chunk=40)
    for table in (*RAW, "content_analysis"):
        assert await pg_rows(pg_url, table) == await pg_rows(pg_url2, table), table
    for table in ROLLUPS:  # counts and histograms exactly; float sums up to the order of additions
        ours, theirs = await pg_rows(pg_url, table), await pg_rows(pg_url2, table)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            for x, y in zip(a, b, strict=True):
                assert math.isclose(x, y, rel_tol=1e-9) if isinstance(x, float) else x == y, table
    info = await pg_rows(pg_url, "model_info")
    assert len(info) == 1 and "2026-11-26T00:00:07Z" in info[0]  # the newer state (the live one) won


async def test_bad_sources_are_named(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(MigrateError, match="--from: no SQLite file"):
        await migrate(tmp_path / "missing.db", pg_url)
    (tmp_path / "text.db").write_text("not a database at all, just text" * 100)
    with pytest.raises(MigrateError, match=r"--from: .* is not a SQLite database"):
        await migrate(tmp_path / "text.db", pg_url)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(MigrateError, match="not ollamon's"):
        await migrate(tmp_path / "other.db", pg_url)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "db", "migrate", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


async def test_cli_migrates_dry_runs_and_names_bad_arguments(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "ollamon.db"
    await fill_sqlite(path, batches(120))
    dry = await asyncio.to_thread(_cli, "--from", f"sqlite:{path}", "--to", pg_url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "120 " in dry.stdout and "nothing written" in dry.stdout
    run = await asyncio.to_thread(_cli, "--from", f"sqlite:{path}", "--to", pg_url, "--chunk", "50")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("migrated ") and "rows/s" in run.stdout
    assert "inference_metrics" in run.stderr and "120/120" in run.stderr  # the progress lines
    assert len(await pg_rows(pg_url, "inference_metrics")) == 120

    bad = await asyncio.to_thread(_cli, "--from", f"sqlite:{tmp_path / 'nope.db'}", "--to", pg_url)
    assert bad.returncode == 2 and "--from: no SQLite file" in bad.stderr
    bad = await asyncio.to_thread(_cli, "--from", f"sqlite:{path}", "--to", "mysql://root:hunter2@h/db")
    assert bad.returncode == 2 and "--to: expected a postgresql:// URL" in bad.stderr
    assert "hunter2" not in bad.stderr
    closed = "postgresql://postgres:hunter2@127.0.0.1:1/none"  # nothing listens on port 1
    bad = await asyncio.to_thread(_cli, "--from", f"sqlite:{path}", "--to", closed)
    assert bad.returncode == 1 and "--to: cannot open the PostgreSQL database" in bad.stderr
    assert "hunter2" not in bad.stderr and "***" in bad.stderr
    bad = await asyncio.to_thread(_cli, "--from", f"sqlite:{path}", "--to", pg_url, "--chunk", "0")
    assert bad.returncode == 2 and "--chunk" in bad.stderr


async def test_cli_ctrl_c_stops_after_a_chunk_and_a_rerun_finishes(
    tmp_path: Path, pg_url: str, pg_url2: str
) -> None:
    path = tmp_path / "ollamon.db"
    records = batches(1500)
    await fill_sqlite(path, records)
    await fill_pg(pg_url2, records)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "db", "migrate", "--from", str(path), "--to", pg_url, "--chunk", "1",
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    conn = await asyncpg.connect(pg_url)
    try:  # wait until rows arrive (one row a transaction: 1,500 of them take seconds), then Ctrl-C
        for _ in range(600):
            if await conn.fetchval(
                "SELECT to_regclass('_migrate_progress')"
            ) is not None and await conn.fetchval("SELECT count(*) FROM inference_metrics"):
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    proc.send_signal(signal.SIGINT)
    _out, raw = await asyncio.wait_for(proc.communicate(), timeout=60)
    err = raw.decode()
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    copied = len(await pg_rows(pg_url, "inference_metrics"))
    assert 0 < copied < 1500
    rerun = await asyncio.to_thread(_cli, "--from", str(path), "--to", pg_url)
    assert rerun.returncode == 0, rerun.stderr
    await assert_same(pg_url, pg_url2)


def test_progress_bar_redraws_on_a_terminal_and_prints_lines_otherwise() -> None:
    state = TableState("inference_metrics", total=1000, done=0)
    tty = io.StringIO()
    bar = Bar(tty, tty=True)
    for done in (250, 500, 1000):
        state.done = state.copied = done
        bar(state)
    state.finished = True
    bar(state)
    drawn = tty.getvalue()
    assert drawn.count("\r") == 4 and drawn.count("\n") == 1 and drawn.endswith("done\x1b[K\n")
    assert "250/1,000" in drawn and "rows/s ETA " in drawn

    log = io.StringIO()
    bar = Bar(log, tty=False, every_s=3600)
    state = TableState("rollup_hour", total=10)
    for done in range(1, 11):
        state.done = state.copied = done
        bar(state)
    state.finished = True
    bar(state)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "10/10" in lines[0] and "\r" not in log.getvalue()
