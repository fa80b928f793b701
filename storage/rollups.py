"""Per-minute and per-hour rollups of inference rows, kept up to date inside the writer's transaction.

Why: a 24-hour summary over a million raw rows cannot be computed from the rows in time, and raw rows are
deleted after ``retention.raw_days``. A rollup row holds, for one minute (``rollup_minute``) or one hour
(``rollup_hour``) and one group, the counts, the sums and a fixed log-scale histogram (storage/histogram.py)
of each latency metric, so any window is answered by adding rows and merging histograms.

Groups ("levels"), so that the common queries read few rows:

* level 0: one model on one endpoint (``model_name``, ``endpoint``);
* level 1: one model, all endpoints (``endpoint = ''``);
* level 2: everything (``model_name = ''``, ``endpoint = ''``).

A NULL model is stored as ``''`` at levels 0 and 1. Rows whose ``done_reason`` is ``load`` or ``unload`` are
not inferences and are not rolled up. Histograms count successful requests only (docs/analytics.md).

``RollupHook`` is a ``SQLiteStore`` batch hook: it adds each batch with one upsert per table, merging
histograms in SQL through the ``ollamon_hist_merge`` function it registers on the writer's connection. It never
rescans raw rows. ``backfill`` builds the same rows from existing raw rows (migration m003).
"""

from __future__ import annotations

import datetime as _dt
import logging
import sqlite3
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import add, itemgetter
from typing import Any

import aiosqlite

from storage.histogram import bucket_index, bucket_indices, encode, merge_blobs
from storage.records import InferenceRecord, Record

try:  # Counter's C counting loop without Counter's own overhead (private, but in CPython since 3.2)
    from collections import _count_elements  # type: ignore[attr-defined]
except ImportError:  # another Python: the same result, in Python

    def _count_elements(mapping: dict[Any, int], iterable: Iterable[Any]) -> None:
        get = mapping.get
        for item in iterable:
            mapping[item] = get(item, 0) + 1


__all__ = [
    "COUNT_COLUMNS",
    "METRICS",
    "NOT_INFERENCE",
    "RAW_COLUMNS",
    "ROLLUP_COLUMNS",
    "TABLES",
    "Agg",
    "RollupHook",
    "agg_of",
    "aggregate",
    "backfill",
    "bucket_of",
    "parse_ts",
    "upsert_sql",
]

logger = logging.getLogger(__name__)

# Latency metrics with a histogram; ``itl_mean_ms`` is each request's mean inter-token gap, so "ITL p95" is
# the 95th percentile over requests of their mean gap (docs/analytics.md).
METRICS: tuple[str, ...] = (
    "response_time_ms",
    "ttft_ms",
    "queue_time_ms",
    "itl_mean_ms",
    "tokens_per_second",
)
COUNT_COLUMNS: tuple[str, ...] = (
    "requests",
    "success",
    "failed",
    "cancelled",
    "prompt_tokens",
    "completion_tokens",
    "energy_j_n",
    "energy_j_sum",
)
ROLLUP_COLUMNS: tuple[str, ...] = (
    "level",
    "bucket",
    "model_name",
    "endpoint",
    *COUNT_COLUMNS,
    *(f"{m}_{part}" for m in METRICS for part in ("n", "sum", "hist")),
)
TABLES = {"rollup_minute": 60, "rollup_hour": 3600}
NOT_INFERENCE = ("load", "unload")
# The raw columns a rollup is built from, in this order (``aggregate`` reads tuples of them).
RAW_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "model_name",
    "endpoint",
    "success",
    "cancelled",
    "done_reason",
    "prompt_tokens",
    "completion_tokens",
    "energy_j",
    *METRICS,
)

Key = tuple[str, int, int, str, str]  # table, level, bucket, model, endpoint


@dataclass(slots=True)
class Agg:
    """Counts, sums and histograms of one rollup row (or of any set of rows)."""

    requests: int = 0
    success: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    energy_j_n: int = 0
    energy_j_sum: float = 0.0
    n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    hists: dict[str, dict[int, int]] = field(default_factory=lambda: {m: {} for m in METRICS})

    def add(self, row: Sequence[Any], hist: bool = True) -> None:
        """Add one raw row given as a tuple in ``RAW_COLUMNS`` order (load/unload already excluded);
        ``hist=False`` keeps counts and sums only. Hot (every request, in the writer's transaction)."""
        self.requests += 1
        if row[3]:
            self.success += 1
        elif row[4]:
            self.cancelled += 1
        else:
            self.failed += 1
        if row[6]:
            self.prompt_tokens += int(row[6])
        if row[7]:
            self.completion_tokens += int(row[7])
        if row[8] is not None:
            self.energy_j_n += 1
            self.energy_j_sum += float(row[8])
        if not row[3]:
            return
        n, sums, hists = self.n, self.sums, self.hists
        for m, value in zip(METRICS, row[9:], strict=True):
            if value is None:
                continue
            n[m] += 1
            sums[m] += value
            if hist:
                h = hists[m]
                i = bucket_index(value)
                h[i] = h.get(i, 0) + 1

    def merge(self, other: Agg) -> None:
        """Add ``other``'s counts, sums and histograms into this one."""
        for c in COUNT_COLUMNS:
            setattr(self, c, getattr(self, c) + getattr(other, c))
        for m in METRICS:
            self.n[m] += other.n[m]
            self.sums[m] += other.sums[m]
            h = self.hists[m]
            for i, count in other.hists[m].items():
                h[i] = h.get(i, 0) + count

    def values(self, key: Key) -> tuple[Any, ...]:
        """The row to upsert for ``key``, in ``ROLLUP_COLUMNS`` order."""
        out: list[Any] = [key[1], key[2], key[3], key[4]]
        out += [getattr(self, c) for c in COUNT_COLUMNS]
        for m in METRICS:
            out += [self.n[m], self.sums[m], encode(self.hists[m]) if self.hists[m] else None]
        return tuple(out)


_EPOCH_CACHE: dict[str, int] = {}


def parse_ts(ts: str) -> int | None:
    """Unix seconds of the minute holding an ISO-8601 UTC timestamp (``2026-11-26T23:07:38.123Z``); None if
    it is not one. Timestamps are parsed by their first 16 characters, cached per minute."""
    head = ts[:16]
    hit = _EPOCH_CACHE.get(head)
    if hit is not None:
        return hit
    try:
        dt = _dt.datetime.fromisoformat(head + ":00+00:00")
    except ValueError:
        return None
    if len(_EPOCH_CACHE) > 100_000:
        _EPOCH_CACHE.clear()
    value = int(dt.timestamp())
    _EPOCH_CACHE[head] = value
    return value


def bucket_of(epoch_s: float, size_s: int) -> int:
    """Start of the ``size_s`` bucket (UTC aligned) holding ``epoch_s``."""
    return int(epoch_s // size_s) * size_s


def aggregate(rows: Iterable[Sequence[Any]]) -> dict[Key, Agg]:
    """Rollup rows (both tables, all levels) of raw rows given in ``RAW_COLUMNS`` order.

    The rows are grouped by (minute, model, endpoint) and each group is added up once, column by column
    (``_group_sums``); the coarser groups are then added up from those. The result is exactly what adding each
    row to its group's ``Agg`` and merging the groups' ``Agg``s in order gives (tests/test_rollup_aggregate.py):
    the same keys in the same order, every float sum added in the same order, the same histograms. Hot: the
    writer calls it for every batch (docs/benchmarks.md, "PostgreSQL ingest")."""
    groups: dict[tuple[int, str, str], list[Sequence[Any]]] = {}
    cached = _EPOCH_CACHE.get
    skipped = 0
    for row in rows:
        if row[5] in NOT_INFERENCE:
            continue
        ts = row[0]
        minute = (cached(ts[:16]) or parse_ts(ts)) if isinstance(ts, str) else None
        if minute is None:
            skipped += 1
            continue
        gkey = (minute, row[1] or "", row[2] or "")
        members = groups.get(gkey)
        if members is None:
            groups[gkey] = [row]
        else:
            members.append(row)
    if skipped:
        logger.warning("rollups: %d row(s) with an unparseable timestamp were not rolled up", skipped)
    # Which groups (by index, in order) each rollup row adds up; keys in the order ``Agg.merge`` met them.
    targets: dict[Key, list[int]] = {}
    for g, (minute, model, endpoint) in enumerate(groups):
        for table, size in TABLES.items():
            b = bucket_of(minute, size)
            for key in ((table, 0, b, model, endpoint), (table, 1, b, model, ""), (table, 2, b, "", "")):
                targets.setdefault(key, []).append(g)
    sums = [_group_sums(members) for members in groups.values()]
    del groups  # fewer live containers while the rollup rows are built: fewer garbage collections
    done: dict[int | tuple[int, ...], tuple[list[Any], list[dict[int, int]]]] = {}
    out: dict[Key, Agg] = {}
    for key, gs in targets.items():
        sig = gs[0] if len(gs) == 1 else tuple(gs)
        hit = done.get(sig)  # e.g. a batch within one minute: each hour row adds what its minute row adds
        if hit is None:
            vec: list[Any] = list(map(add, _ZERO, sums[gs[0]][0]))
            for g in gs[1:]:
                vec = list(map(add, vec, sums[g][0]))
            hists = _counted(gs, sums)
            done[sig] = (vec, hists)
            out[key] = _agg(vec, hists)
        else:
            out[key] = _agg(hit[0], [dict(h) for h in hit[1]])
    return out


def agg_of(rows: list[Sequence[Any]]) -> Agg:
    """One ``Agg`` of raw rows in ``RAW_COLUMNS`` order (load/unload already excluded): what ``Agg.add`` of each
    row in turn gives, the same counts, sums and histograms (sums added in the same order from 0.0), computed
    a column at a time like one group of ``aggregate``."""
    if not rows:
        return Agg()
    vec, indices = _group_sums(rows)
    return _agg(vec, [_counts(i) for i in indices])


def _counted(gs: list[int], sums: list[tuple[list[Any], list[list[int]]]]) -> list[dict[int, int]]:
    """Each metric's histogram of the groups ``gs``, counted from their bucket indices (in C: cheaper than
    merging the groups' histograms in Python, or even in C with ``map``, measured)."""
    if len(gs) == 1:
        return [_counts(i) for i in sums[gs[0]][1]]
    columns: list[list[int]] = [[] for _ in METRICS]
    for g in gs:
        for column, part in zip(columns, sums[g][1], strict=True):
            column += part
    return [_counts(c) for c in columns]


# An empty ``Agg`` as ``_group_sums`` lays it out: COUNT_COLUMNS, then each metric's n, then each one's sum.
_ZERO: tuple[Any, ...] = (0,) * 7 + (0.0,) + (0,) * len(METRICS) + (0.0,) * len(METRICS)
_METRIC_AT = tuple(itemgetter(RAW_COLUMNS.index(m)) for m in METRICS)
_PROMPT, _COMPLETION, _ENERGY = (itemgetter(RAW_COLUMNS.index(c)) for c in RAW_COLUMNS[6:9])


def _counts(indices: list[int]) -> dict[int, int]:
    """``{bucket index: count}`` of bucket indices, counted in C (``Counter``'s counting loop, without the
    ~1.5 us of ``Counter()``'s own overhead; about 250 histograms a batch)."""
    out: dict[int, int] = {}
    _count_elements(out, indices)
    return out


def _group_sums(rows: list[Sequence[Any]]) -> tuple[list[Any], list[list[int]]]:
    """What ``Agg.add`` of each row in turn adds up, as (``_ZERO``'s layout, each metric's bucket indices): whole
    columns at a time, each float sum still added row by row from 0.0 (``reduce``). Row by row below
    ``_COLUMNS_FROM`` rows, where the ~10 us a group of the columns' calls would cost more."""
    if len(rows) < _COLUMNS_FROM:
        return _row_sums(rows)
    ok = [r for r in rows if r[3]]
    cancelled = 0 if len(ok) == len(rows) else len([r for r in rows if not r[3] and r[4]])
    energy = [float(v) for v in map(_ENERGY, rows) if v is not None]
    vec: list[Any] = [
        len(rows),
        len(ok),
        len(rows) - len(ok) - cancelled,
        cancelled,
        sum([int(v) for v in map(_PROMPT, rows) if v]),
        sum([int(v) for v in map(_COMPLETION, rows) if v]),
        len(energy),
        reduce(add, energy, 0.0),
    ]
    totals: list[Any] = []
    indices: list[list[int]] = []
    for get in _METRIC_AT:
        values = list(map(get, ok))
        if None in values:
            values = [v for v in values if v is not None]
        vec.append(len(values))
        totals.append(reduce(add, values, 0.0))
        indices.append(bucket_indices(values))
    vec += totals
    return vec, indices


_COLUMNS_FROM = 12
_N_AT = len(COUNT_COLUMNS)  # where _ZERO's metric counts start, then their sums
_SUM_AT = _N_AT + len(METRICS)


def _row_sums(rows: list[Sequence[Any]]) -> tuple[list[Any], list[list[int]]]:
    """``_group_sums`` of a few rows, one row at a time (``Agg.add``'s steps)."""
    vec = list(_ZERO)
    indices: list[list[int]] = [[] for _ in METRICS]
    for row in rows:
        vec[0] += 1
        if row[3]:
            vec[1] += 1
        elif row[4]:
            vec[3] += 1
        else:
            vec[2] += 1
        if row[6]:
            vec[4] += int(row[6])
        if row[7]:
            vec[5] += int(row[7])
        if row[8] is not None:
            vec[6] += 1
            vec[7] += float(row[8])
        if row[3]:
            for j, (value, idx) in enumerate(zip(row[9:], indices, strict=True), _N_AT):
                if value is not None:
                    vec[j] += 1
                    vec[j + _SUM_AT - _N_AT] += value
                    idx.append(bucket_index(value))
    return vec, indices


def _agg(vec: Sequence[Any], hists: Sequence[dict[int, int]]) -> Agg:
    """An ``Agg`` from ``_ZERO``'s layout and each metric's histogram (taken as they are, not copied)."""
    n, sums = vec[_N_AT:_SUM_AT], vec[_SUM_AT:]
    by_metric = [dict(zip(METRICS, n, strict=True)), dict(zip(METRICS, sums, strict=True))]
    by_metric.append(dict(zip(METRICS, hists, strict=True)))
    return Agg(*vec[:_N_AT], *by_metric)  # positional: half the cost of keywords (one Agg per rollup row)


def upsert_sql(table: str) -> str:
    """INSERT of one rollup row that adds into the existing row of the same group and bucket."""
    cols = ", ".join(ROLLUP_COLUMNS)
    marks = ", ".join("?" * len(ROLLUP_COLUMNS))
    sets = [f"{c} = {c} + excluded.{c}" for c in COUNT_COLUMNS]
    for m in METRICS:
        sets += [f"{m}_n = {m}_n + excluded.{m}_n", f"{m}_sum = {m}_sum + excluded.{m}_sum"]
        sets.append(f"{m}_hist = ollamon_hist_merge({m}_hist, excluded.{m}_hist)")
    return (
        f"INSERT INTO {table} ({cols}) VALUES ({marks}) "
        f"ON CONFLICT (level, bucket, model_name, endpoint) DO UPDATE SET {', '.join(sets)}"
    )


_UPSERTS = {t: upsert_sql(t) for t in TABLES}


def _grouped(aggs: dict[Key, Agg]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {t: [] for t in TABLES}
    for key, agg in aggs.items():
        out[key[0]].append(agg.values(key))
    return out


def _record_row(r: InferenceRecord) -> tuple[Any, ...]:
    return (
        r.timestamp,
        r.model_name,
        r.endpoint,
        r.success,
        r.cancelled,
        r.done_reason,
        r.prompt_tokens,
        r.completion_tokens,
        getattr(r, "energy_j", None),
        *(getattr(r, m) for m in METRICS),
    )


class RollupHook:
    """``SQLiteStore.add_hook(RollupHook())``: adds every batch's inference records to the rollups."""

    def __init__(self) -> None:
        self._registered: weakref.WeakSet[aiosqlite.Connection] = weakref.WeakSet()
        self.batches = 0

    async def __call__(self, db: aiosqlite.Connection, records: Sequence[Record]) -> None:
        rows = [_record_row(r) for r in records if isinstance(r, InferenceRecord)]
        if not rows:
            return
        if db not in self._registered:
            await db.create_function("ollamon_hist_merge", 2, merge_blobs, deterministic=True)
            self._registered.add(db)
        for table, values in _grouped(aggregate(rows)).items():
            if values:
                await db.executemany(_UPSERTS[table], values)
        self.batches += 1


def backfill(conn: sqlite3.Connection, chunk_rows: int = 50_000) -> int:
    """Roll up every existing raw row (sync, inside the caller's transaction); returns rows read.

    Reads ``inference_metrics`` in id order, ``chunk_rows`` at a time, so memory stays bounded."""
    conn.create_function("ollamon_hist_merge", 2, merge_blobs, deterministic=True)
    present = {row[1] for row in conn.execute("PRAGMA table_info(inference_metrics)")}
    cols = ", ".join(c if c in present else "NULL" for c in RAW_COLUMNS)
    last_id = 0
    total = 0
    while True:
        chunk = conn.execute(
            f"SELECT id, {cols} FROM inference_metrics WHERE id > ? ORDER BY id LIMIT ?",
            (last_id, chunk_rows),
        ).fetchall()
        if not chunk:
            return total
        last_id = chunk[-1][0]
        total += len(chunk)
        for table, values in _grouped(aggregate(row[1:] for row in chunk)).items():
            if values:
                conn.executemany(_UPSERTS[table], values)
