"""Exact summaries guided by the rollups (storage/exact.py) give exactly what fetching every value gives, and
fall back to that when the rollups do not match the raw rows; quantiles of unmerged histograms
(``parts_quantile``) equal those of the merged histogram."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import exact, queries
from storage.histogram import BUCKETS, blob_part, counts_part, encode, hist_quantile, parts_quantile
from storage.queries import FIGURES, Filters, summary
from tests.analytics_gen import open_store, records_between, write

HOUR = 3600.0
NOW = time.time()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * abs(b) + 1e-9
    return bool(a == b)


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["exact"] is want["exact"] is True
    for name in (*FIGURES, "cache_reuse_ratio"):
        assert _same(got["overall"][name], want["overall"][name]), (name, got["overall"][name])
    assert [m["model"] for m in got["models"]] == [m["model"] for m in want["models"]]
    for g, w in zip(got["models"], want["models"], strict=True):
        for name in (*FIGURES, "cache_reuse_ratio"):
            assert _same(g[name], w[name]), (g["model"], name, g[name], w[name])


@pytest.fixture(name="spy")
def spy_fixture(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each guided selection found its answer (True) or fell back (False)."""
    seen: list[bool] = []
    select = exact.select

    def spying(*args: Any, **kw: Any) -> Any:
        found = select(*args, **kw)
        seen.append(found is not None)
        return found

    monkeypatch.setattr(queries.exact, "select", spying)
    return seen


async def _db(path: Path, n: int = 6000, seed: int = 3, zero_itl: bool = False) -> sqlite3.Connection:
    rng = random.Random(seed)
    recs = records_between(rng, NOW - 3 * HOUR, NOW, n)
    for i, r in enumerate(recs):
        if zero_itl and i % 10 < 7:
            r.itl_mean_ms = 0.0
        if i % 4 == 0:
            r.prompt_cached_tokens, r.prompt_new_tokens = rng.randint(0, 300), rng.randint(1, 300)
    store = await open_store(path)
    await write(store, recs)
    await store.close()
    return sqlite3.connect(path)


WINDOWS = [
    (NOW - HOUR, NOW),
    (NOW - 2.5 * HOUR - 13.7, NOW - 61.3),
    (NOW - 20 * 60 - 0.5, NOW - 30),
    (NOW - 3 * HOUR - 5, NOW + 1),
]


async def test_guided_exact_equals_fetching_every_value(tmp_path: Path, spy: list[bool]) -> None:
    conn = await _db(tmp_path / "g.db")
    for f in (Filters(), Filters(model="qwen2.5:7b"), Filters(endpoint="/api/generate")):
        for since, until in WINDOWS:
            spy.clear()
            got = summary(conn, since, until, f, exact=True)
            assert spy == [True], (f, since, until)  # the guided path answered
            _assert_same(got, summary(conn, since, until, f, exact=True, guided=False))
            one = summary(conn, since, until, f, exact=True, per_model=False)
            assert one["overall"] == got["overall"]


async def test_rows_the_rollups_do_not_know_make_it_fall_back(tmp_path: Path, spy: list[bool]) -> None:
    """Raw rows written without their rollups (an import, a hand edit): the checks see it, the answer is
    still the exact one."""
    conn = await _db(tmp_path / "f.db", n=3000)
    ts = queries.iso_utc(NOW - 1800)
    conn.executemany(
        "INSERT INTO inference_metrics (timestamp, request_id, model_name, endpoint, success, cancelled, "
        "response_time_ms, ttft_ms) VALUES (?, ?, 'mistral:latest', '/api/chat', 1, 0, ?, ?)",
        [(ts, f"x{i}", 50.0 + i, 5.0 + i) for i in range(40)],
    )
    conn.commit()
    spy.clear()
    got = summary(conn, NOW - HOUR, NOW, exact=True)
    assert spy == [False]
    _assert_same(got, summary(conn, NOW - HOUR, NOW, exact=True, guided=False))


async def test_bucket_zero_values_all_equal_or_fall_back(tmp_path: Path, spy: list[bool]) -> None:
    """ITL means of 0 ms fill bucket 0 (values <= 0.001): answered from SQL's min = max, and when they
    differ there (-0.0005, 0 and 0.0005: same bucket, same count, same sum), by fetching everything."""
    conn = await _db(tmp_path / "z.db", n=3000, zero_itl=True)
    spy.clear()
    got = summary(conn, NOW - 2 * HOUR, NOW, exact=True)
    assert spy == [True]
    assert got["overall"]["itl_ms_p50"] == 0.0
    _assert_same(got, summary(conn, NOW - 2 * HOUR, NOW, exact=True, guided=False))
    ids = [i for (i,) in conn.execute("SELECT id FROM inference_metrics WHERE itl_mean_ms = 0 ORDER BY id")]
    pairs = ids[: 2 * (len(ids) // 4)]
    conn.executemany(
        "UPDATE inference_metrics SET itl_mean_ms = 0.0005 WHERE id = ?", [(i,) for i in pairs[::2]]
    )
    conn.executemany(
        "UPDATE inference_metrics SET itl_mean_ms = -0.0005 WHERE id = ?", [(i,) for i in pairs[1::2]]
    )
    conn.commit()
    spy.clear()
    got = summary(conn, NOW - 2 * HOUR, NOW, exact=True)
    assert spy == [False]
    _assert_same(got, summary(conn, NOW - 2 * HOUR, NOW, exact=True, guided=False))


histograms = st.lists(
    st.dictionaries(st.integers(0, BUCKETS - 1), st.integers(1, 10**6), max_size=60), min_size=1, max_size=12
)


@settings(max_examples=200, deadline=None)
@given(histograms, st.sampled_from([0.0, 0.01, 0.5, 0.95, 0.99, 1.0]))
def test_quantile_of_unmerged_parts_equals_the_merged_histogram(hs: list[dict[int, int]], q: float) -> None:
    merged: dict[int, int] = {}
    for h in hs:
        for i, c in h.items():
            merged[i] = merged.get(i, 0) + c
    total = sum(merged.values())
    parts = [blob_part(encode(h)) if k % 2 else counts_part(h) for k, h in enumerate(hs)]
    want = hist_quantile(merged, q, total) if total else None
    assert parts_quantile(parts, q, total) == want
