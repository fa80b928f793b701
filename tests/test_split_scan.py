"""The exact summary's per-group queries cut into time slices read by helper threads (storage/split_scan.py):
the same figures as one connection reading the whole window, on real SQLite files; never where a helper's
connection could see something else than the caller's (an open transaction, an in-memory database)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import storage.queries as queries
import storage.split_scan as split_scan
from storage.queries import Filters, summary
from storage.records import iso_utc
from tests.test_exact_summary import _diff, write_grouped

HOUR = 3600.0

_SQL = (
    "SELECT COUNT(*), TOTAL(x), SUM(n), group_concat(CASE WHEN x > 0.5 THEN printf('%!.17g', x) END), "
    "MIN(x), MAX(x) FROM t WHERE g IS ? AND ts >= ? AND ts < ?"
)
_KINDS = [split_scan.SUM, split_scan.SUM, split_scan.SUM, split_scan.CONCAT, split_scan.MIN, split_scan.MAX]


def _fill(conn: sqlite3.Connection, rng: random.Random) -> None:
    conn.execute("CREATE TABLE t (g TEXT, ts TEXT, x REAL, n INTEGER)")
    rows = []
    for i in range(4000):
        g = rng.choice(["a", "b", None])
        # group "late" only in the window's last minutes: the early slices have none of its rows (NULL MIN/SUM)
        if i % 50 == 0:
            g = "late"
        ts = 1000.0 + (3500 + rng.random() * 100 if g == "late" else rng.random() * 3600)
        rows.append((g, iso_utc(ts), rng.random(), rng.choice([None, rng.randint(0, 9)])))
    conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
    conn.commit()


def _canonical(row: Any) -> list[Any]:
    """A row with its concatenated values sorted (their order follows the slices) and floats rounded."""
    out: list[Any] = []
    for v in row:
        if isinstance(v, str):
            out.append(sorted(float(x) for x in v.split(",")))
        elif isinstance(v, float):
            out.append(round(v, 9))
        else:
            out.append(v)
    return out


@pytest.mark.parametrize("helpers", [1, 3])
def test_slices_merge_to_the_whole_window(tmp_path: Path, monkeypatch: Any, helpers: int) -> None:
    """Counts and sums add, texts join, minima and maxima take the extreme, a slice without rows adds
    nothing (its NULLs): every group's merged row is the row one query over the whole window gives."""
    conn = sqlite3.connect(tmp_path / "t.db")
    _fill(conn, random.Random(5))
    monkeypatch.setattr(split_scan, "helpers", lambda: helpers)
    slices: list[Any] = []
    real = split_scan._read_slice
    monkeypatch.setattr(split_scan, "_read_slice", lambda *a: slices.append(a[4]) or real(*a))
    values = ["a", "b", None, "late", "none-such"]
    for since, until in [(1000.0, 4600.0), (1200.5, 4599.0), (4550.0, 4551.0)]:
        slices.clear()
        got = split_scan.group_rows(
            conn, _SQL, values, since, until, lambda lo, hi: [iso_utc(lo), iso_utc(hi)], _KINDS
        )
        assert len(slices) == helpers  # the caller read one slice, a helper each of the others
        bounds = sorted({b for s in slices for b in s} | {iso_utc(since), iso_utc(until)})
        assert bounds[0] == iso_utc(since) and bounds[-1] == iso_utc(until) and len(bounds) == helpers + 2
        for value, row in zip(values, got, strict=True):
            want = conn.execute(_SQL, [value, iso_utc(since), iso_utc(until)]).fetchone()
            assert row is not None and _canonical(row) == _canonical(want), (since, value, row, want)
    assert got[4] == (0, 0.0, None, None, None, None)  # no row at all: COUNT 0, TOTAL 0.0, the rest NULL


def test_one_connection_where_no_other_would_see_the_same(tmp_path: Path, monkeypatch: Any) -> None:
    """An in-memory database, a connection inside a transaction (its uncommitted rows), one core: the caller
    reads every group itself."""
    monkeypatch.setattr(split_scan, "helpers", lambda: 1)
    called: list[Any] = []
    monkeypatch.setattr(split_scan, "_read_slice", lambda *a: called.append(a) or [])
    params = lambda lo, hi: [iso_utc(lo), iso_utc(hi)]  # noqa: E731
    memory = sqlite3.connect(":memory:")
    _fill(memory, random.Random(6))
    rows = split_scan.group_rows(memory, _SQL, ["a", "b"], 1000.0, 4600.0, params, _KINDS)
    assert [r[0] for r in rows if r] == [
        memory.execute("SELECT COUNT(*) FROM t WHERE g = ?", (g,)).fetchone()[0] for g in ("a", "b")
    ]
    disk = sqlite3.connect(tmp_path / "t.db")
    _fill(disk, random.Random(6))
    disk.execute("INSERT INTO t VALUES ('a', ?, 0.25, 1)", (iso_utc(2000.0),))  # not committed
    assert disk.in_transaction
    rows = split_scan.group_rows(disk, _SQL, ["a"], 1000.0, 4600.0, params, _KINDS)
    assert (
        rows[0] is not None
        and rows[0][0] == disk.execute("SELECT COUNT(*) FROM t WHERE g = 'a'").fetchone()[0]
    )
    disk.rollback()
    monkeypatch.setattr(split_scan, "helpers", lambda: 0)
    split_scan.group_rows(disk, _SQL, ["a"], 1000.0, 4600.0, params, _KINDS)
    assert not called


async def test_split_summaries_equal_one_connection_summaries(tmp_path: Path, monkeypatch: Any) -> None:
    """Whole exact summaries (guided and not, filtered, by upstream and instance, windows of an hour down to
    two seconds) give every figure alike with 0, 1 and 3 helpers (sums to 1e-12: the same values added in
    another order), and the helpers are the ones that read the other slices."""
    now = await write_grouped(tmp_path / "s.db", seed=21, n=3000, no_model_every=9, cache=True)
    conn = sqlite3.connect(tmp_path / "s.db")
    cases: list[tuple[float, float, Filters, str | None, bool]] = [
        (now - 1.5 * HOUR - 3.1, now - 5.5, Filters(), None, True),
        (now - 1.5 * HOUR - 3.1, now - 5.5, Filters(), None, False),
        (now - HOUR, now, Filters(model="qwen2.5:7b"), None, True),
        (now - HOUR, now, Filters(), "upstream", True),
        (now - 900, now - 60, Filters(), "instance", True),
        (now - 1800.25, now - 1798.25, Filters(), None, True),
    ]
    monkeypatch.setattr(queries, "_SPLIT_MIN_ROWS", 0)  # these windows hold 2 to 2,300 rows: split them all
    reads: list[Any] = []
    real = split_scan._read_slice
    monkeypatch.setattr(split_scan, "_read_slice", lambda *a: reads.append(a) or real(*a))
    answers: dict[int, list[Any]] = {}
    for helpers in (0, 1, 3):
        monkeypatch.setattr(split_scan, "helpers", lambda h=helpers: h)
        reads.clear()
        answers[helpers] = [
            summary(conn, since, until, f, exact=True, by=by, guided=guided)
            for since, until, f, by, guided in cases
        ]
        # each summary reads through a slice per helper (a summary by upstream or instance reads twice)
        assert len(reads) >= helpers * len(cases) and (helpers or not reads)
    assert answers[0][0]["overall"]["requests"] > 1000 and len(answers[0][0]["models"]) == 4
    assert answers[0][5]["overall"]["requests"] >= 0
    for helpers in (1, 3):
        for case, got, want in zip(cases, answers[helpers], answers[0], strict=True):
            _diff(got, want, (helpers, case))
    monkeypatch.setattr(queries, "_SPLIT_MIN_ROWS", 500)  # under that many rows: the caller alone
    reads.clear()
    summary(conn, now - 600, now, exact=True)
    assert not reads
    summary(conn, now - 3600, now, exact=True)
    assert len(reads) == 3


def test_a_helpers_error_reaches_the_caller_and_no_helper_outlives_the_call(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A slice that fails (a locked or vanished file) fails the read as the caller's own would; every helper
    thread has ended when the call returns, whichever way."""
    import threading

    conn = sqlite3.connect(tmp_path / "t.db")
    _fill(conn, random.Random(7))
    monkeypatch.setattr(split_scan, "helpers", lambda: 2)
    real = split_scan._read_slice
    calls: list[Any] = []
    fail_one = threading.Event()

    def flaky(*a: Any) -> list[Any]:
        calls.append(a)
        if fail_one.is_set():
            fail_one.clear()
            raise sqlite3.OperationalError("database is locked")
        return real(*a)

    monkeypatch.setattr(split_scan, "_read_slice", flaky)
    params = lambda lo, hi: [iso_utc(lo), iso_utc(hi)]  # noqa: E731
    fail_one.set()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        split_scan.group_rows(conn, _SQL, ["a", "b"], 1000.0, 4600.0, params, _KINDS)
    assert len(calls) == 2 and not fail_one.is_set()
    assert not [t for t in threading.enumerate() if t.name == "ollamon-exact-slice"]
    rows = split_scan.group_rows(conn, _SQL, ["a"], 1000.0, 4600.0, params, _KINDS)
    assert (
        rows[0] is not None
        and rows[0][0] == conn.execute("SELECT COUNT(*) FROM t WHERE g = 'a'").fetchone()[0]
    )
    assert len(calls) == 4
    assert not [t for t in threading.enumerate() if t.name == "ollamon-exact-slice"]
