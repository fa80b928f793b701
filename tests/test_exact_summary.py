"""The exact summary's SQL path (counts and sums in SQL, values column by column) against the row-by-row
path it replaced (``Acc.add_raw`` on every raw row) and against the records themselves, on a real SQLite file.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from storage.queries import FIGURES, Acc, Filters, figures, summary
from storage.records import InferenceRecord, iso_utc
from storage.rollups import RAW_COLUMNS
from tests.analytics_gen import open_store, records_between, write

HOUR = 3600.0


def _row_by_row(conn: sqlite3.Connection, since: float, until: float, model: str | None) -> dict[str, Any]:
    """The figures as the old exact path made them: every raw row through ``Acc.add_raw``."""
    acc = Acc(exact=True)
    sql = (
        f"SELECT {', '.join(RAW_COLUMNS)} FROM inference_metrics WHERE timestamp >= ? AND timestamp < ? "
        "AND (done_reason IS NULL OR done_reason NOT IN ('load', 'unload'))"
    )
    for row in conn.execute(sql, (iso_utc(since), iso_utc(until))):
        if model is None or row[1] == model:
            acc.add_raw(row)
    return figures(acc, until - since)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return bool(abs(a - b) <= 1e-9 * abs(b) + 1e-9)


async def write_grouped(path: Path, *, seed: int, n: int, no_model_every: int, cache: bool = False) -> float:
    """``n`` records over the 2 h before now on three upstreams (one of them NULL) and two instances, every
    ``no_model_every``-th without a model, with prompt-cache estimates on every third when ``cache``, written
    to a new store at ``path``; returns that now."""
    rng = random.Random(seed)
    now = time.time()
    recs = records_between(rng, now - 2 * HOUR, now, n)
    for i, r in enumerate(recs):
        r.upstream = [None, "gpu-a", "gpu-b"][i % 3]
        r.instance = ["i1", "i2"][i % 2]
        if i % no_model_every == 0:
            r.model_name = None
        if cache and i % 3 == 0:
            r.prompt_cached_tokens, r.prompt_new_tokens = rng.randint(0, 500), rng.randint(1, 500)
    store = await open_store(path)
    await write(store, recs)
    await store.close()
    return now


async def test_exact_summary_matches_row_by_row_and_cache_sums(tmp_path: Path) -> None:
    rng = random.Random(11)
    now = time.time()
    recs: list[InferenceRecord] = records_between(rng, now - 2 * HOUR, now, 3000)
    for i, r in enumerate(recs):
        if i % 3 == 0:  # some rows carry the prompt-cache estimates, others not (NULL)
            r.prompt_cached_tokens = rng.randint(0, 500)
            r.prompt_new_tokens = rng.randint(1, 500)
        elif i % 3 == 1:
            r.prompt_cached_tokens = rng.randint(0, 500)  # one estimate alone does not count
    store = await open_store(tmp_path / "e.db")
    await write(store, recs)
    await store.close()
    conn = sqlite3.connect(tmp_path / "e.db")
    since, until = now - 1.5 * HOUR - 7.3, now - 12.1
    got = summary(conn, since, until, exact=True)
    assert got["exact"] is True
    want = _row_by_row(conn, since, until, None)
    assert want["requests"] > 1000 and want["failed"] > 0 and want["cancelled"] > 0
    for name in FIGURES:
        assert _same(got["overall"][name], want[name]), (name, got["overall"][name], want[name])
    assert len(got["models"]) > 1
    for m in got["models"]:
        ref = _row_by_row(conn, since, until, m["model"])
        for name in FIGURES:
            assert _same(m[name], ref[name]), (m["model"], name, m[name], ref[name])
        both = [
            r
            for r in recs
            if r.model_name == m["model"]
            and iso_utc(since) <= r.timestamp < iso_utc(until)
            and r.done_reason not in ("load", "unload")
            and r.prompt_cached_tokens is not None
            and r.prompt_new_tokens is not None
        ]
        cached = sum(r.prompt_cached_tokens or 0 for r in both)
        new = sum(r.prompt_new_tokens or 0 for r in both)
        assert both and m["cache_reuse_ratio"] == cached / (cached + new)
    # a filtered exact summary reads only that model's rows
    model = got["models"][0]["model"]
    one = summary(conn, since, until, Filters(model=model), exact=True)
    assert [m["model"] for m in one["models"]] == [model]
    assert one["overall"]["requests"] == got["models"][0]["requests"]


async def test_one_query_per_group_answers_as_the_grouped_scan(tmp_path: Path, monkeypatch: Any) -> None:
    """The per-group queries through the (column, timestamp) indexes give every figure the one grouped scan
    gives, in the same order: per model (rows without a model too), filtered, by user (unguided), and per
    upstream and instance; and they are the path taken (no ``GROUP BY`` over the window's rows)."""
    import storage.queries as q

    now = await write_grouped(tmp_path / "g.db", seed=12, n=2500, no_model_every=7)
    conn = sqlite3.connect(tmp_path / "g.db")
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    since, until = now - 1.5 * HOUR - 3.1, now - 5.5
    cases: list[tuple[Filters, str | None]] = [
        (Filters(), None),
        (Filters(model="qwen2.5:7b"), None),
        (Filters(user="alice"), None),
        (Filters(), "upstream"),
        (Filters(), "instance"),
        (Filters(upstream="gpu-a"), "upstream"),
    ]
    per_group = []
    for f, by in cases:
        seen.clear()
        per_group.append(summary(conn, since, until, f, exact=True, by=by))
        scans = [s for s in seen if "FROM inference_metrics WHERE" in s and "COUNT(*)" in s]
        assert scans and not any("GROUP BY" in s for s in scans), (f, by, scans)
    assert len(per_group[0]["models"]) == 4  # three models and the rows without one
    assert len(per_group[3]["groups"]) == 3 and len(per_group[4]["groups"]) == 2
    assert len(per_group[5]["groups"]) == 1
    monkeypatch.setattr(q, "_GROUPS_MAX", 0)  # every table holds more values than that: the grouped scan
    for (f, by), got in zip(cases, per_group, strict=True):
        seen.clear()
        want = summary(conn, since, until, f, exact=True, by=by)
        assert any("GROUP BY" in s for s in seen)
        _diff(got, want, (f, by))
    assert per_group[0]["overall"]["requests"] > 1000


def _diff(a: Any, b: Any, where: Any, path: str = "") -> None:
    """``a == b`` key by key and item by item, floats to 1e-12 (a sum's last bits follow the row order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, path, list(a), b)
        for k in a:
            _diff(a[k], b[k], where, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, path)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, where, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):  # sums: the same rows added in another order
        assert abs(a - b) <= 1e-12 * abs(b), (where, path, a, b)
    else:
        assert a == b, (where, path, a, b)
