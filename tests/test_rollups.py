"""The fixed histogram's error bound, and rollups equal to a recomputation from the raw rows."""

from __future__ import annotations

import calendar
import random
import sqlite3
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.histogram import (
    ALPHA,
    MIN_VALUE,
    bucket_index,
    bucket_value,
    counts_of,
    decode,
    encode,
    exact_quantile,
    hist_quantile,
    merge_blobs,
)
from storage.migrations import MIGRATIONS, apply_migrations
from storage.records import InferenceRecord
from storage.retention import Retention, RetentionPolicy, floor_hour
from storage.rollups import METRICS, TABLES
from tests.analytics_gen import open_store, records_between, write

QS = (0.5, 0.95, 0.99)


def dense_of(values: list[float]) -> dict[int, int]:
    return counts_of(values)


def within_bound(estimate: float | None, truth: float) -> bool:
    assert estimate is not None
    return abs(estimate - truth) <= ALPHA * abs(truth) + MIN_VALUE + 1e-9 * abs(truth)


distributions = st.one_of(
    st.lists(st.floats(0.0, 1e7, allow_nan=False), min_size=1, max_size=300),
    st.builds(
        lambda mu, sigma, n, seed: [random.Random(seed).lognormvariate(mu, sigma) for _ in range(n)],
        st.floats(-2, 12),
        st.floats(0.01, 3),
        st.integers(1, 400),
        st.integers(0, 2**32),
    ),
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 100.0, 5000.0]), min_size=1, max_size=50),
)


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_histogram_percentiles_within_stated_bound(values: list[float]) -> None:
    srt = sorted(values)
    dense = dense_of(values)
    for q in QS:
        truth = exact_quantile(srt, q)
        assert truth is not None
        assert within_bound(hist_quantile(dense, q), truth), (q, truth, hist_quantile(dense, q))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=2, max_size=200))
def test_exact_quantile_is_statistics_inclusive(values: list[float]) -> None:
    ref = statistics.quantiles(values, n=100, method="inclusive")
    srt = sorted(values)
    for q, k in ((0.5, 49), (0.95, 94), (0.99, 98)):
        got = exact_quantile(srt, q)
        assert got is not None
        assert abs(got - ref[k]) <= 1e-9 * max(1.0, abs(ref[k]))


@given(st.floats(MIN_VALUE * 1.0001, 1e9, allow_nan=False))
def test_every_value_is_within_alpha_of_its_bucket(v: float) -> None:
    assert abs(bucket_value(bucket_index(v)) - v) <= ALPHA * v * (1 + 1e-9)


@given(st.lists(st.floats(0, 1e8, allow_nan=False), max_size=100), st.lists(st.floats(0, 1e8), max_size=100))
def test_encode_decode_and_merge(a: list[float], b: list[float]) -> None:
    ca, cb = counts_of(a), counts_of(b)
    idx, cnt = decode(encode(ca))
    assert dict(zip(idx, cnt, strict=True)) == {k: v for k, v in ca.items() if v}
    merged = merge_blobs(encode(ca) or None, encode(cb) or None)
    expect = defaultdict(int, ca)
    for k, v in cb.items():
        expect[k] += v
    got = dict(zip(*decode(merged), strict=True)) if merged else {}
    assert got == {k: v for k, v in expect.items() if v}


# -- rollups against an independent recomputation --------------------------------------------------


def expected_rollups(
    records: list[InferenceRecord], keep: dict[str, int]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Plain-Python rollups of ``records`` for buckets >= ``keep[table]`` (no storage code besides the
    bucket map)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        if r.done_reason in ("load", "unload"):
            continue
        minute = calendar.timegm(time.strptime(r.timestamp[:16], "%Y-%m-%dT%H:%M"))
        for table, size in TABLES.items():
            b = minute - minute % size
            if b < keep[table]:
                continue
            model, ep = r.model_name or "", r.endpoint
            for key in ((table, 0, b, model, ep), (table, 1, b, model, ""), (table, 2, b, "", "")):
                e = out.setdefault(key, defaultdict(int))
                e["requests"] += 1
                e["success"] += r.success
                e["cancelled"] += (not r.success) and r.cancelled
                e["failed"] += (not r.success) and not r.cancelled
                e["prompt_tokens"] += r.prompt_tokens or 0
                e["completion_tokens"] += r.completion_tokens or 0
                if r.success:
                    for m in METRICS:
                        v = getattr(r, m)
                        if v is not None:
                            e[f"{m}_n"] += 1
                            e.setdefault(f"{m}_hist", defaultdict(int))[bucket_index(v)] += 1
    return out


def actual_rollups(path: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for table in TABLES:
        for row in conn.execute(f"SELECT * FROM {table}"):
            e: dict[str, Any] = {}
            for c in ("requests", "success", "failed", "cancelled", "prompt_tokens", "completion_tokens"):
                e[c] = row[c]
            for m in METRICS:
                if row[f"{m}_n"]:
                    e[f"{m}_n"] = row[f"{m}_n"]
                if row[f"{m}_hist"] is not None:
                    e[f"{m}_hist"] = dict(zip(*decode(row[f"{m}_hist"]), strict=True))
            out[(table, row["level"], row["bucket"], row["model_name"], row["endpoint"])] = e
    conn.close()
    return out


def normalise(d: dict[tuple[Any, ...], dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {k: {f: (dict(v) if isinstance(v, dict) else v) for f, v in e.items() if v} for k, e in d.items()}


async def test_rollups_equal_recomputation_after_inserts_retention_and_restarts(tmp_path: Path) -> None:
    rng = random.Random(4)
    path = tmp_path / "r.db"
    now = time.time()
    policy = RetentionPolicy(raw_days=3, system_days=1, rollup_days=5, batch_rows=50)
    written: list[InferenceRecord] = []
    store = await open_store(path)
    next_id = 0
    for step in range(12):
        action = rng.choice(["insert", "insert", "insert", "retention", "restart"])
        if action == "insert" or step == 0:
            lo = now - rng.uniform(0, 7) * 86400
            recs = records_between(rng, lo, lo + rng.uniform(60, 20000), rng.randint(1, 300), next_id)
            next_id += len(recs)
            await write(store, recs, batch=rng.choice([1, 7, 100, 500]))
            written += recs
        elif action == "retention":
            await Retention(policy, path, pause_s=0).run_once(store, now=now)
        else:
            await store.close()
            store = await open_store(path)
    await Retention(policy, path, pause_s=0).run_once(store, now=now)
    await store.close()
    keep = {"rollup_minute": floor_hour(now - 3 * 86400), "rollup_hour": floor_hour(now - 5 * 86400)}
    actual = normalise(actual_rollups(path))
    assert len(actual) > 100
    assert actual == normalise(expected_rollups(written, keep))
    # and the raw rows left are exactly those inside the raw window
    conn = sqlite3.connect(path)
    left = {r[0] for r in conn.execute("SELECT request_id FROM inference_metrics")}
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(keep["rollup_minute"]))
    assert left == {r.request_id for r in written if r.timestamp >= cutoff}
    assert 0 < len(left) < len(written)  # retention did delete something, and not everything


async def test_migration_backfills_rollups_from_existing_rows(tmp_path: Path) -> None:
    """A database from before m003 gets rollups for the rows it already holds."""
    rng = random.Random(9)
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    # Everything before m003, plus the later column additions, so that today's store can write its rows.
    before = [m for m in MIGRATIONS if m.__name__ < "m003" or m.__name__ >= "m006"]
    apply_migrations(conn, before)
    conn.close()
    from storage.sqlite import SQLiteStore

    recs = records_between(rng, time.time() - 86400, time.time(), 700)
    # write with a store whose migrations are already applied up to m002 only: no hook, no rollups yet
    store = SQLiteStore(path)
    store._prepare = lambda: []  # type: ignore[method-assign]
    await store.open()
    await write(store, recs)
    await store.close()
    conn = sqlite3.connect(path)
    assert "rollup_minute" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    applied = apply_migrations(conn)
    conn.close()
    assert "m003_rollups" in applied
    assert normalise(actual_rollups(path)) == normalise(expected_rollups(recs, dict.fromkeys(TABLES, 0)))


def test_migration_from_m001_only_schema_backfills(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "m001.db"
    conn = sqlite3.connect(path)
    apply_migrations(conn, MIGRATIONS[:1])
    recs = records_between(rng, time.time() - 7200, time.time(), 300)
    cols = ("timestamp", "request_id", "model_name", "endpoint", "success", "cancelled", "done_reason")
    cols += (*METRICS, "prompt_tokens", "completion_tokens")
    conn.executemany(
        f"INSERT INTO inference_metrics ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [tuple(getattr(r, c) for c in cols) for r in recs],
    )
    conn.commit()
    assert "m003_rollups" in apply_migrations(conn)
    conn.close()
    assert normalise(actual_rollups(path)) == normalise(expected_rollups(recs, dict.fromkeys(TABLES, 0)))
