"""Daily rollups (storage/rollup_day.py): compacted from the hourly rows by maintenance, equal to them, and a
summary that reads them answers what the hourly rows answer, across day boundaries, the partial current
day, late writes into a finished day, and retention cutting a day in two."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import queries, rollup_day
from storage.histogram import decode
from storage.queries import FIGURES, Filters, summary, timeseries
from storage.retention import Retention, RetentionPolicy
from storage.rollups import COUNT_COLUMNS, METRICS
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.analytics_gen import open_store, records_between, write

DAY = 86400.0
HOUR = 3600.0
NOW = (time.time() // DAY) * DAY + 13.5 * HOUR + 17.25  # mid-afternoon UTC: a partial current day


@pytest.fixture(name="db")
async def db_fixture(tmp_path: Path) -> Path:
    """Six days of requests (and their minute and hour rollups), written through the store's hook."""
    path = tmp_path / "d.db"
    store = await open_store(path)
    await write(store, records_between(random.Random(5), NOW - 6 * DAY, NOW, 6000))
    await store.close()
    return path


async def _compact(path: Path, now: float = NOW, recent: bool = False) -> int:
    store = SQLiteStore(path)
    await store.open()
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()
    try:
        if recent:
            return await rollup_day.compact_recent(writer, path, now)
        return await rollup_day.compact(writer, path, now)
    finally:
        await writer.stop()
        await store.close()


def _hours_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The computation before rollup_day: no day (nor 5-minute bucket) is usable, every whole hour is read
    from rollup_hour and every minute from rollup_minute."""
    with monkeypatch.context() as m:
        m.setattr(rollup_day, "usable", lambda *a, **k: set())
        yield


def _same(a: Any, b: Any) -> bool:
    """Counts and percentiles identical; float sums (another order of additions) within 1e-9."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * abs(b) + 1e-9
    return bool(a == b)


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in FIGURES:
        assert _same(got["overall"][name], want["overall"][name]), (name, got["overall"], want["overall"])
    assert ("models" in got) == ("models" in want)
    assert [m["model"] for m in got.get("models", [])] == [m["model"] for m in want.get("models", [])]
    for g, w in zip(got.get("models", []), want.get("models", []), strict=True):
        for name in FIGURES:
            assert _same(g[name], w[name]), (g["model"], name, g[name], w[name])


WINDOWS = [
    (NOW - 6 * DAY, NOW),  # whole days in the middle, a partial first day, the partial current day
    (NOW - 3 * DAY - 5 * HOUR - 11.5, NOW - 2 * HOUR),
    ((NOW // DAY - 4) * DAY, (NOW // DAY - 1) * DAY),  # exactly three days, aligned on both ends
    ((NOW // DAY - 2) * DAY - 1, (NOW // DAY - 1) * DAY + 1),  # one day and a second on each side
]


def _with_and_without(conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> None:
    for since, until in WINDOWS:
        got = summary(conn, since, until, exact=False, **kw)
        for _ in _hours_only(monkeypatch):
            want = summary(conn, since, until, exact=False, **kw)
        _assert_same(got, want)


def _hour_merge(conn: sqlite3.Connection, day: int) -> dict[tuple[int, str, str], dict[str, Any]]:
    """Reference: the hour rows of ``day`` added up column by column, histograms as dicts."""
    out: dict[tuple[int, str, str], dict[str, Any]] = {}
    conn.row_factory = sqlite3.Row
    for r in conn.execute(
        "SELECT * FROM rollup_hour WHERE bucket >= ? AND bucket < ? ORDER BY bucket", (day, day + DAY)
    ):
        acc = out.setdefault((r["level"], r["model_name"], r["endpoint"]), {"source_rows": 0})
        acc["source_rows"] += 1
        for c in COUNT_COLUMNS + tuple(f"{m}_{p}" for m in METRICS for p in ("n", "sum")):
            acc[c] = acc.get(c, 0) + r[c]
        for m in METRICS:
            h = acc.setdefault(f"{m}_hist", {})
            if r[f"{m}_hist"]:
                for i, c in zip(*decode(r[f"{m}_hist"]), strict=True):
                    h[i] = h.get(i, 0) + c
    conn.row_factory = None
    return out


def _day_rows(conn: sqlite3.Connection, day: int) -> dict[tuple[int, str, str], dict[str, Any]]:
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM rollup_day WHERE bucket = ?", (day,)).fetchall()
    conn.row_factory = None
    out = {}
    for r in rows:
        d = {k: r[k] for k in r.keys() if k not in ("id", "level", "bucket", "model_name", "endpoint")}
        for m in METRICS:
            blob = d[f"{m}_hist"]
            d[f"{m}_hist"] = dict(zip(*decode(blob), strict=True)) if blob else {}
        out[(r["level"], r["model_name"], r["endpoint"])] = d
    return out


def _assert_day_equals_hours(conn: sqlite3.Connection, day: int) -> None:
    want, got = _hour_merge(conn, day), _day_rows(conn, day)
    assert set(got) == set(want), day
    for key, w in want.items():
        for col, value in w.items():
            assert _same(got[key][col], value), (day, key, col)


async def test_days_equal_their_hours_and_summaries_do_not_change(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(db)
    today = int(NOW // DAY) * DAY
    before = [summary(conn, s, u, exact=False) for s, u in WINDOWS]
    assert conn.execute("SELECT COUNT(*) FROM rollup_day").fetchone()[0] == 0
    assert await _compact(db) == 6  # the six finished days; never today
    assert await _compact(db) == 0  # nothing stale the second time
    days = [int(d) for (d,) in conn.execute("SELECT DISTINCT bucket FROM rollup_day ORDER BY bucket")]
    assert days == [today - k * int(DAY) for k in range(6, 0, -1)]
    for day in days:
        _assert_day_equals_hours(conn, day)
    # the day rows are read (usable), and the answers are the ones from hours
    assert rollup_day.usable_days(conn, days[0], today, 1, [], []) == set(days)
    for (since, until), want in zip(WINDOWS, before, strict=True):
        _assert_same(summary(conn, since, until, exact=False), want)
    _with_and_without(conn, monkeypatch)
    _with_and_without(conn, monkeypatch, filters=Filters(model="mistral"))
    _with_and_without(conn, monkeypatch, filters=Filters(endpoint="/api/chat"))
    _with_and_without(conn, monkeypatch, per_model=False)


async def test_a_late_write_into_a_finished_day_is_seen_then_compacted(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _compact(db)
    conn = sqlite3.connect(db)
    day = int(NOW // DAY) * DAY - 3 * int(DAY)
    late = records_between(random.Random(9), day + 5 * HOUR, day + 5 * HOUR + 60, 3, first_id=900_000)
    for r in late:
        r.model_name = "mistral:latest"
    store = await open_store(db)
    await write(store, late)
    await store.close()
    # the day's rows no longer match its hours: readers take the hours, for every level
    for level in (0, 1, 2):
        assert day not in rollup_day.usable_days(conn, day - int(DAY), day + 2 * int(DAY), level, [], [])
    _with_and_without(conn, monkeypatch)
    assert await _compact(db) == 1
    assert day in rollup_day.usable_days(conn, day, day + int(DAY), 1, [], [])
    _assert_day_equals_hours(conn, day)
    _with_and_without(conn, monkeypatch)


async def test_retention_cutting_a_day_rebuilds_it_and_drops_days_without_hours(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _compact(db)
    conn = sqlite3.connect(db)
    before = {int(d) for (d,) in conn.execute("SELECT DISTINCT bucket FROM rollup_day")}
    store = SQLiteStore(db)
    await store.open()
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()
    try:
        # rollups kept 4.3 days: the cutoff falls inside a day
        policy = RetentionPolicy(raw_days=30, system_days=30, rollup_days=4.3)
        result = await Retention(policy, db, pause_s=0).run_once(writer, now=NOW)
    finally:
        await writer.stop()
        await store.close()
    assert result["error"] is None
    cut = int((NOW - 4.3 * DAY) // HOUR) * int(HOUR)
    cut_day = cut - cut % int(DAY)
    assert cut % int(DAY), "the test wants the cutoff inside a day"
    assert result["rollup_days_compacted"] >= 1
    after = {int(d) for (d,) in conn.execute("SELECT DISTINCT bucket FROM rollup_day")}
    assert after == {d for d in before if d >= cut_day}
    _assert_day_equals_hours(conn, cut_day)  # rebuilt from the hours retention left
    assert conn.execute("SELECT MIN(bucket) FROM rollup_hour").fetchone()[0] == cut
    _with_and_without(conn, monkeypatch)


def test_migration_m012_makes_the_table(tmp_path: Path) -> None:
    from storage.migrations import MIGRATIONS, apply_migrations

    conn = sqlite3.connect(tmp_path / "m.db")
    names = [m.__name__ for m in MIGRATIONS]
    apply_migrations(conn, MIGRATIONS[: names.index("m012_rollup_day")])
    assert not queries.columns_of(conn, "rollup_day")
    assert "m012_rollup_day" in apply_migrations(conn)
    hour = [r[1] for r in conn.execute("PRAGMA table_info(rollup_hour)")]
    for table in ("rollup_day", "rollup_5m"):
        assert [r[1] for r in conn.execute(f"PRAGMA table_info({table})")] == [*hour, "source_rows"]
    assert apply_migrations(conn) == []


TREND = ["requests", "failed", "tokens_per_s", "ttft_ms_p50", "ttft_ms_p95", "response_time_ms_p95"]
TREND_WINDOWS = [(NOW - DAY, NOW), (NOW - 2 * HOUR - 7.5, NOW - 31), (NOW - 3 * DAY, NOW - 2 * DAY)]


def _trends_same(conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    for f in (Filters(), Filters(model="qwen2.5:7b"), Filters(endpoint="/api/chat")):
        for since, until in TREND_WINDOWS:
            got = timeseries(conn, since, until, "5m", TREND, f)
            for _ in _hours_only(monkeypatch):
                want = timeseries(conn, since, until, "5m", TREND, f)
            assert len(got["series"]) == len(want["series"])
            for g, w in zip(got["series"], want["series"], strict=True):
                assert g["bucket"] == w["bucket"]
                for name in TREND:
                    assert _same(g[name], w[name]), (f, g["bucket"], name, g[name], w[name])


async def test_five_minute_rows_of_the_last_two_days_answer_the_5m_trend(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(db)
    written = await _compact(db, recent=True)
    buckets = [int(b) for (b,) in conn.execute("SELECT DISTINCT bucket FROM rollup_5m ORDER BY bucket")]
    assert written == len(buckets) > 200
    assert buckets[0] >= NOW - 2 * DAY - 300 and buckets[-1] + 300 <= NOW  # finished buckets, 2 days
    assert await _compact(db, recent=True) == 0
    level2 = rollup_day.usable(conn, rollup_day.FIVE_MINUTES, buckets[0], buckets[-1] + 300, 2, [], [])
    assert level2 == set(buckets)
    _trends_same(conn, monkeypatch)
    # summaries read the whole 5 minutes at their edges from them too, exact ones as their guide
    _with_and_without(conn, monkeypatch)
    for since, until in ((NOW - HOUR - 13.1, NOW), (NOW - 25 * 60, NOW - 100)):
        exact = summary(conn, since, until, exact=True)
        _assert_same(exact, summary(conn, since, until, exact=True, guided=False))
    # a late write: that bucket goes back to its minutes until compacted again
    b = buckets[len(buckets) // 2]
    late = records_between(random.Random(4), b + 10, b + 20, 2, first_id=800_000)
    store = await open_store(db)
    await write(store, late)
    await store.close()
    assert b not in rollup_day.usable(conn, rollup_day.FIVE_MINUTES, b, b + 300, 2, [], [])
    _trends_same(conn, monkeypatch)
    assert await _compact(db, recent=True) == 1
    assert b in rollup_day.usable(conn, rollup_day.FIVE_MINUTES, b, b + 300, 2, [], [])
    # buckets older than two days are dropped on a later run
    assert await _compact(db, NOW + DAY, recent=True) == 0  # the day since is compacted already
    oldest = conn.execute("SELECT MIN(bucket) FROM rollup_5m").fetchone()[0]
    assert oldest >= NOW + DAY - 2 * DAY - 300
