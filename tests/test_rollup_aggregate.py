"""``aggregate`` (the writer's rollup step, tuned for speed) against the plain definition it must equal exactly.

The reference adds each row to its (minute, model, endpoint) ``Agg`` with ``Agg.add`` and merges those into
every rollup row with ``Agg.merge``, in order: what ``aggregate`` did before it worked column by column. The two
must give the same keys in the same order, the same integers, bit-identical float sums (same additions in the
same order) and the same histograms, on rows meant to hit every branch: failed, cancelled, load/unload, NULL
model and endpoint, bad timestamps, two spellings of one minute, NULL, zero, negative, huge, infinite and NaN
values, ints among floats, and groups on both sides of the row-by-row/columns switch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import rollups
from storage.histogram import MAX_VALUE, MIN_VALUE, bucket_index, bucket_indices, encode
from storage.rollups import (
    COUNT_COLUMNS,
    METRICS,
    NOT_INFERENCE,
    TABLES,
    Agg,
    agg_of,
    aggregate,
    bucket_of,
    parse_ts,
)

Key = tuple[str, int, int, str, str]


def reference(rows: Iterable[Sequence[Any]]) -> dict[Key, Agg]:
    base: dict[tuple[int, str, str], Agg] = {}
    for row in rows:
        if row[5] in NOT_INFERENCE:
            continue
        minute = parse_ts(row[0]) if isinstance(row[0], str) else None
        if minute is None:
            continue
        base.setdefault((minute, row[1] or "", row[2] or ""), Agg()).add(row)
    out: dict[Key, Agg] = {}
    for (minute, model, endpoint), agg in base.items():
        for table, size in TABLES.items():
            b = bucket_of(minute, size)
            for key in ((table, 0, b, model, endpoint), (table, 1, b, model, ""), (table, 2, b, "", "")):
                out.setdefault(key, Agg()).merge(agg)
    return out


def exact(v: Any) -> tuple[str, str]:
    """A value with its type, floats by repr: 0.1 + 0.2 and 0.3 differ, so do 1 and 1.0, and NaN equals NaN."""
    return type(v).__name__, repr(v)


def flat(aggs: dict[Key, Agg]) -> list[Any]:
    out: list[Any] = []
    for key, a in aggs.items():
        counts = [exact(getattr(a, c)) for c in COUNT_COLUMNS]
        metrics = [(m, exact(a.n[m]), exact(a.sums[m]), a.hists[m], encode(a.hists[m])) for m in METRICS]
        out.append((key, counts, list(a.n), list(a.sums), list(a.hists), metrics))
    return out


STAMPS = (
    "2026-11-26T23:07:38.123Z",
    "2026-11-26T23:07:59Z",
    "2026-11-26 23:07:01",  # the same minute, spelled otherwise: one group with the two above
    "2026-11-26T23:08:00.000Z",
    "2026-11-26T23:59:59.999Z",
    "2026-11-27T00:00:00Z",
    "not a time",
    None,
)
NUMBERS = st.one_of(
    st.none(),
    st.floats(0.0005, 5e4),
    st.integers(0, 3000),
    st.sampled_from([0.0, -1.0, -0.0, MIN_VALUE, MAX_VALUE, 2e9, math.inf, -math.inf, math.nan, 1e-300]),
)
ROWS = st.tuples(
    st.sampled_from(STAMPS),
    st.sampled_from([None, "", "llama3", "qwen3"]),
    st.sampled_from([None, "", "/api/chat", "/v1/chat/completions"]),
    st.sampled_from([True, False, 1, 0]),
    st.booleans(),
    st.sampled_from([None, "stop", "length", "load", "unload"]),
    st.one_of(st.none(), st.integers(0, 500), st.floats(0, 500)),
    st.one_of(st.none(), st.integers(0, 500)),
    st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    *(NUMBERS,) * len(METRICS),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ROWS, max_size=120), st.sampled_from([1, 3, 10**9]))
def test_aggregate_equals_row_by_row_reference(rows: list[tuple[Any, ...]], columns_from: int) -> None:
    """``columns_from``: every group added column by column (1), row by row (10**9), or either (3)."""
    with patch.object(rollups, "_COLUMNS_FROM", columns_from):
        assert flat(aggregate(rows)) == flat(reference(rows))


@settings(max_examples=200, deadline=None)
@given(st.lists(ROWS, max_size=60), st.sampled_from([1, 3, 10**9]))
def test_agg_of_equals_adding_each_row(rows: list[tuple[Any, ...]], columns_from: int) -> None:
    """``agg_of`` (a summary's raw edge rows, a column at a time) is ``Agg.add`` of each row, bit for bit."""
    rows = [r for r in rows if r[5] not in NOT_INFERENCE]
    want = Agg()
    for row in rows:
        want.add(row)
    with patch.object(rollups, "_COLUMNS_FROM", columns_from):
        got = agg_of(rows)
    assert flat({("x", 0, 0, "", ""): got}) == flat({("x", 0, 0, "", ""): want})


def realistic(n: int, groups: int, seed: int) -> list[tuple[Any, ...]]:
    """``n`` mostly successful rows over a few minutes, ``groups`` (model, endpoint) pairs: big groups."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ok = rnd.random() > 0.1
        values: list[float | None] = [rnd.lognormvariate(6, 1), rnd.lognormvariate(4, 1), rnd.random() * 3]
        values.append(rnd.random() * 40)
        values.append(rnd.uniform(5, 80))
        if rnd.random() < 0.05:
            values[rnd.randrange(len(values))] = None
        out.append(
            (
                f"2026-11-26T23:{7 + i * 3 // n:02d}:{rnd.randrange(60):02d}.{rnd.randrange(1000):03d}Z",
                f"m{i % groups}",
                ("/api/chat", "/api/generate")[i % 2],
                ok,
                not ok and rnd.random() < 0.3,
                "stop",
                rnd.randrange(1, 2000),
                rnd.randrange(1, 900),
                rnd.random() * 50 if i % 3 else None,
                *values,
            )
        )
    return out


@pytest.mark.parametrize(("n", "groups"), [(500, 1), (500, 6), (2000, 3), (50, 25)])
def test_aggregate_equals_reference_on_big_batches(n: int, groups: int) -> None:
    rows = realistic(n, groups, seed=n + groups)
    assert flat(aggregate(rows)) == flat(reference(rows))


def test_every_rollup_row_owns_its_dicts() -> None:
    """The PostgreSQL writer merges stored histograms into each row's dicts in place: none may be shared,
    not even between a minute row and the hour row that adds up the same groups."""
    out = aggregate(realistic(300, 2, seed=1))
    dicts = [d for a in out.values() for d in (a.n, a.sums, a.hists, *a.hists.values())]
    assert len({id(d) for d in dicts}) == len(dicts) == len(out) * (3 + len(METRICS))


def test_unparseable_timestamps_are_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    rows = realistic(20, 1, seed=2)
    rows[3] = ("garbage", *rows[3][1:])
    rows[5] = (None, *rows[5][1:])
    out = aggregate(rows)
    assert sum(a.requests for k, a in out.items() if k[0] == "rollup_hour" and k[1] == 2) == 18
    assert "2 row(s) with an unparseable timestamp" in caplog.text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-5, 10**6), st.sampled_from([MIN_VALUE, MAX_VALUE]))))
def test_bucket_indices_equals_bucket_index(values: list[float]) -> None:
    assert bucket_indices(values) == [bucket_index(v) for v in values]
