"""Performance summaries and trends: the figures of docs/analytics.md over any window.

Two sources, same definitions. **Exact**: the raw ``inference_metrics`` rows of the window, percentiles from
the sorted values. **Rollups**: whole UTC days from ``rollup_day`` (where compacted and still equal to their
hours, storage/rollup_day.py), the other whole hours from ``rollup_hour``, whole minutes at the edges from
``rollup_minute``, and the partial minutes at the two ends from raw rows, so counts, sums and averages are
exact either way and only percentiles are estimated (within ``histogram.ALPHA``, 1%). ``"exact"`` in every
answer says which. Short windows (<= ``EXACT_MAX_WINDOW_S`` holding <= ``EXACT_MAX_ROWS`` rows) and anything
filtered by user (rollups have no users) are exact; the rest use rollups unless asked otherwise.
``cache_reuse_ratio`` (an estimate, docs/conversations.md) is given only by exact summaries: rollups do not
keep the cache columns.

Everything here is synchronous on a ``sqlite3.Connection`` (the API runs it on a thread with its own
read-only connection; the CLI opens the file directly); an exact summary may read slices of its window on
helper threads at the same time, each on a read-only connection of its own (storage/split_scan.py).
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, groupby
from operator import add
from typing import Any, cast

from storage import exact, rollup_day, split_scan
from storage.accumulator import Acc
from storage.histogram import BUCKETS, decode
from storage.model_names import canonical_model_name
from storage.records import iso_utc
from storage.rollup_day import DAY_S
from storage.rollups import METRICS, RAW_COLUMNS, Agg, parse_ts

__all__ = [
    "BUCKET_SIZES",
    "BY",
    "EXACT_MAX_ROWS",
    "EXACT_MAX_WINDOW_S",
    "FIGURES",
    "MAX_SERIES_POINTS",
    "Acc",
    "Filters",
    "QueryError",
    "columns_of",
    "resources",
    "summary",
    "timeseries",
]

EXACT_MAX_WINDOW_S = 3600.0
EXACT_MAX_ROWS = 20_000  # above this, even a short window is answered from rollups (it stays fast)
BUCKET_SIZES = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
MAX_SERIES_POINTS = 10_000
_CHUNK_ROWS = 50_000  # raw rows fetched at a time by an exact summary: bounded memory, few Python steps
_CACHE_COLUMNS = ("prompt_cached_tokens", "prompt_new_tokens")
# Below this many raw rows in the window an exact summary reads it on one connection: a helper thread and its
# connection cost about what a second core saves on a few thousand rows (storage/split_scan.py).
_SPLIT_MIN_ROWS = 4000
_GUIDED_MIN_S = 600  # below 10 whole minutes of rollups, fetching every value is as cheap (and simpler)
_EXCLUDE_LOADS = "(done_reason IS NULL OR done_reason NOT IN ('load', 'unload'))"
# summary(by=...) -> the column its groups are per (raw rows only: the rollups keep neither)
BY: dict[str, str] = {"upstream": "upstream", "instance": "instance"}


class QueryError(ValueError):
    """A query cannot be answered as asked; ``param`` names the parameter at fault."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Filters:
    """Optional equality filters; ``None`` means any. ``model`` is resolved as Ollama resolves it
    (``llama3.2`` -> ``llama3.2:latest``, storage/model_names.py), the name rows store, so either spelling
    finds the same rows."""

    model: str | None = None
    endpoint: str | None = None
    user: str | None = None
    upstream: str | None = None  # the Ollama host's name (docs/upstreams.md); rollups do not keep it
    instance: str | None = None  # the ollamon instance that wrote the row (server.instance); nor this

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", canonical_model_name(self.model))

    def as_dict(self) -> dict[str, str | None]:
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "user": self.user,
            "upstream": self.upstream,
            "instance": self.instance,
        }

    @property
    def raw_only(self) -> bool:
        """A filter the rollups cannot answer (they keep no users, upstreams or instances): raw rows only."""
        return self.user is not None or self.upstream is not None or self.instance is not None

    @property
    def raw_param(self) -> str | None:
        """The first filter the rollups cannot answer, by its parameter name."""
        return next((p for p in ("user", "upstream", "instance") if getattr(self, p) is not None), None)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


Figure = Callable[[Acc, float], Any]
FIGURES: dict[str, Figure] = {
    "requests": lambda a, s: a.agg.requests,
    "successful": lambda a, s: a.agg.success,
    "failed": lambda a, s: a.agg.failed,
    "cancelled": lambda a, s: a.agg.cancelled,
    "error_rate": lambda a, s: _ratio(a.agg.failed, a.agg.requests),
    "requests_per_s": lambda a, s: _ratio(a.agg.requests, s),
    "tokens_per_s": lambda a, s: _ratio(a.agg.completion_tokens, s),
    "prompt_tokens": lambda a, s: a.agg.prompt_tokens,
    "completion_tokens": lambda a, s: a.agg.completion_tokens,
    "response_time_ms_avg": lambda a, s: a.mean("response_time_ms"),
    "response_time_ms_p50": lambda a, s: a.quantile("response_time_ms", 0.5),
    "response_time_ms_p95": lambda a, s: a.quantile("response_time_ms", 0.95),
    "response_time_ms_p99": lambda a, s: a.quantile("response_time_ms", 0.99),
    "ttft_ms_avg": lambda a, s: a.mean("ttft_ms"),
    "ttft_ms_p50": lambda a, s: a.quantile("ttft_ms", 0.5),
    "ttft_ms_p95": lambda a, s: a.quantile("ttft_ms", 0.95),
    "ttft_ms_p99": lambda a, s: a.quantile("ttft_ms", 0.99),
    "queue_time_ms_p50": lambda a, s: a.quantile("queue_time_ms", 0.5),
    "queue_time_ms_p95": lambda a, s: a.quantile("queue_time_ms", 0.95),
    "itl_ms_p50": lambda a, s: a.quantile("itl_mean_ms", 0.5),
    "itl_ms_p95": lambda a, s: a.quantile("itl_mean_ms", 0.95),
    "tokens_per_second_avg": lambda a, s: a.mean("tokens_per_second"),
    "tokens_per_second_p50": lambda a, s: a.quantile("tokens_per_second", 0.5),
    "energy_j": lambda a, s: a.agg.energy_j_sum if a.agg.energy_j_n else None,
}
# The metric columns each figure needs (a timeseries of one figure reads only those).
_NEEDS: dict[str, tuple[str, ...]] = {
    name: tuple(
        m for m in METRICS if name.startswith(m) or (m == "itl_mean_ms" and name.startswith("itl_ms"))
    )
    for name in FIGURES
}


class _AskedFor:
    """Stands in for an ``Acc`` to learn which quantiles ``FIGURES`` ask of each metric."""

    def __init__(self) -> None:
        self.agg = Agg()
        self.asked: dict[str, list[float]] = {m: [] for m in METRICS}

    def quantile(self, m: str, q: float) -> None:
        if q not in self.asked[m]:
            self.asked[m].append(q)

    def mean(self, m: str) -> None:
        return None


def _quantiles_asked() -> dict[str, tuple[float, ...]]:
    probe = _AskedFor()
    for fn in FIGURES.values():
        fn(cast(Acc, probe), 1.0)
    return {m: tuple(qs) for m, qs in probe.asked.items()}


# The quantiles each metric's figures need (an exact summary finds exactly these, storage/exact.py).
QUANTILES = _quantiles_asked()


def figures(acc: Acc, seconds: float, names: Iterable[str] = FIGURES) -> dict[str, Any]:
    return {n: FIGURES[n](acc, seconds) for n in names}


def columns_of(conn: sqlite3.Connection, table: str) -> set[str]:
    """Column names of ``table`` (empty when it does not exist)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _raw_select(conn: sqlite3.Connection) -> str:
    present = columns_of(conn, "inference_metrics")
    return ", ".join(c if c in present else f"NULL AS {c}" for c in RAW_COLUMNS)


def _raw_where(since: float, until: float, f: Filters) -> tuple[str, list[Any]]:
    where = ["timestamp >= ?", "timestamp < ?", _EXCLUDE_LOADS]
    params: list[Any] = [iso_utc(since), iso_utc(until)]
    for col, value in (
        ("model_name", f.model),
        ("endpoint", f.endpoint),
        ("user_id", f.user),
        ("upstream", f.upstream),
        ("instance", f.instance),
    ):
        if value is not None:
            where.append(f"{col} = ?")
            params.append(value)
    return " AND ".join(where), params


def _raw_rows(
    conn: sqlite3.Connection, since: float, until: float, f: Filters, extra: str = ""
) -> sqlite3.Cursor:
    where, params = _raw_where(since, until, f)
    return conn.execute(f"SELECT {_raw_select(conn)}{extra} FROM inference_metrics WHERE {where}", params)


def _reuse(sums: Sequence[int] | None) -> float | None:
    """``cache_reuse_ratio``: cached / (cached + new), None without estimated tokens."""
    return None if not sums else _ratio(sums[0], sums[0] + sums[1])


def _level_where(f: Filters, per_model: bool) -> tuple[int, list[str], list[Any]]:
    """The rollup level and conditions answering ``f`` (per model when ``per_model``)."""
    where: list[str] = []
    params: list[Any] = []
    if f.endpoint is not None:
        level = 0
        where.append("endpoint = ?")
        params.append(f.endpoint)
    else:
        level = 1 if per_model or f.model is not None else 2
    if f.model is not None:
        where.append("model_name = ?")
        params.append(f.model)
    return level, where, params


def _rollup_rows(
    conn: sqlite3.Connection,
    table: str,
    start: int,
    end: int,
    f: Filters,
    per_model: bool,
    metrics: Sequence[str] = METRICS,
) -> Iterable[sqlite3.Row]:
    level, where, params = _level_where(f, per_model)
    cols = ["bucket", "model_name", "requests", "success", "failed", "cancelled"]
    cols += ["prompt_tokens", "completion_tokens", "energy_j_n", "energy_j_sum"]
    cols += [f"{m}_{p}" for m in metrics for p in ("n", "sum", "hist")]
    sql = f"SELECT {', '.join(cols)} FROM {table} WHERE level = ? AND bucket >= ? AND bucket < ?" + "".join(
        f" AND {w}" for w in where
    )
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, [level, start, end, *params]).fetchall()
    finally:
        conn.row_factory = None


def _plan(
    since: float, until: float
) -> tuple[list[tuple[float, float]], list[tuple[int, int]], tuple[int, int] | None]:
    """Split [since, until) into raw partial minutes, whole minutes and whole hours."""
    m0, m1 = math.ceil(since / 60) * 60, math.floor(until / 60) * 60
    if m0 >= m1:
        return [(since, until)], [], None
    raw = ([(since, float(m0))] if since < m0 else []) + ([(float(m1), until)] if m1 < until else [])
    h0, h1 = math.ceil(m0 / 3600) * 3600, math.floor(m1 / 3600) * 3600
    if h0 >= h1:
        return raw, [(m0, m1)], None
    minutes = ([(m0, h0)] if m0 < h0 else []) + ([(h1, m1)] if h1 < m1 else [])
    return raw, minutes, (h0, h1)


def _split_days(
    conn: sqlite3.Connection, hours: tuple[int, int], f: Filters
) -> tuple[list[tuple[int, int]], tuple[int, int, set[int]] | None]:
    """Whole hours [h0, h1) split into the hour ranges to read from ``rollup_hour`` and the whole UTC days to
    read from ``rollup_day`` (start, end, the days whose day rows still match their hours); a day whose day
    rows are missing or stale is read from its hours (storage/rollup_day.py)."""
    h0, h1 = hours
    d0, d1 = math.ceil(h0 / DAY_S) * DAY_S, math.floor(h1 / DAY_S) * DAY_S
    if d0 >= d1:
        return [hours], None
    level, where, params = _level_where(f, per_model=True)
    usable = rollup_day.usable_days(conn, d0, d1, level, where, params)
    ranges = [(h0, d0)] if h0 < d0 else []
    for day in range(d0, d1, DAY_S):
        if day in usable:
            continue
        if ranges and ranges[-1][1] == day:
            ranges[-1] = (ranges[-1][0], day + DAY_S)  # consecutive days read as one range
        else:
            ranges.append((day, day + DAY_S))
    if d1 < h1:
        if ranges and ranges[-1][1] == d1:
            ranges[-1] = (ranges[-1][0], h1)
        else:
            ranges.append((d1, h1))
    return ranges, ((d0, d1, usable) if usable else None)


def _rows_at_most(conn: sqlite3.Connection, since: float, until: float, limit: int) -> bool:
    """Whether the window holds at most ``limit`` raw rows (a bounded index count: a few ms at most)."""
    sql = "SELECT COUNT(*) FROM (SELECT 1 FROM inference_metrics WHERE timestamp >= ? AND timestamp < ? LIMIT ?) AS capped"
    n = conn.execute(sql, (iso_utc(since), iso_utc(until), limit + 1)).fetchone()[0]
    return int(n) <= limit


def _model_key(name: Any) -> str:
    return name or ""


def _acc_getter(accs: dict[str, Acc], exact: bool) -> Callable[[Any], Acc]:
    """``acc_for(name)``: the accumulator in ``accs`` of ``name``'s group, made on first use. Called per rollup
    and raw edge row, so it never builds an ``Acc`` to throw away (as ``dict.setdefault`` would)."""

    def acc_for(name: Any) -> Acc:
        key = _model_key(name)
        a = accs.get(key)
        if a is None:
            a = accs[key] = Acc(exact)
        return a

    return acc_for


# The group columns with an index on (column, timestamp) (m013, m014, m015), and the ``Filters`` field of each.
_TIME_INDEXED = {"model_name": "model", "upstream": "upstream", "instance": "instance"}
# Distinct values a group column may hold for one query per group; past it, one grouped scan.
_GROUPS_MAX = 256


def _group_values(conn: Any, group: str, f: Filters, since: float, until: float) -> list[Any] | None:
    """The values of ``group`` with raw rows in [since, until), in ``GROUP BY`` order (NULL first), found by
    seeking SQLite's (``group``, timestamp) index: two seeks per distinct value the table holds. None where a
    grouped scan is the way: PostgreSQL (it aggregates by hashing, without the sort), no such index (a database
    opened read-only before m015), or more than ``_GROUPS_MAX`` distinct values."""
    if not isinstance(conn, sqlite3.Connection) or group not in _TIME_INDEXED:
        return None
    indexed = False
    for _, name, _, _, partial in conn.execute("PRAGMA index_list(inference_metrics)"):
        cols = [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
        indexed = indexed or (not partial and cols[:2] == [group, "timestamp"])
    if not indexed:
        return None
    lo, hi = iso_utc(since), iso_utc(until)
    probe = f"SELECT 1 FROM inference_metrics WHERE {group} IS ? AND timestamp >= ? AND timestamp < ? LIMIT 1"
    wanted = getattr(f, _TIME_INDEXED[group])
    if wanted is not None:  # filtered to one value: the other groups have no row
        return [wanted] if conn.execute(probe, (wanted, lo, hi)).fetchone() else []
    out: list[Any] = [None] if conn.execute(probe, (None, lo, hi)).fetchone() else []
    value = conn.execute(f"SELECT MIN({group}) FROM inference_metrics").fetchone()[0]  # MIN skips NULL
    for _ in range(_GROUPS_MAX):
        if value is None:
            return out
        if conn.execute(probe, (value, lo, hi)).fetchone():
            out.append(value)
        value = conn.execute(
            f"SELECT MIN({group}) FROM inference_metrics WHERE {group} > ?", (value,)
        ).fetchone()[0]
    return None if value is not None else out


def _exact_into(
    conn: sqlite3.Connection,
    since: float,
    until: float,
    f: Filters,
    acc_for: Callable[[Any], Acc],
    *,
    guided: bool = True,
    group: str = "model_name",
) -> tuple[dict[str, list[int]], dict[str, dict[float, float | None]] | None]:
    """An exact summary's per-model counts, sums and quantiles: the counting and summing done by SQL (on
    SQLite one query per group, its window cut into time slices read on several cores where worth it,
    storage/split_scan.py; on PostgreSQL one grouped scan). The quantiles: where the rollups cover the
    window (and ``guided``), the same scan returns only the raw values of the buckets holding the wanted ranks (storage/exact.py); otherwise, or when its
    checks fail, every metric value of the successful rows is fetched, column by column, and sorted. Same
    figures as ``Acc.add_raw`` row by row, at a fraction of the Python work (docs/benchmarks.md, "Queries
    at 1M rows").

    Returns ``{model key: [sum of prompt_cached_tokens, sum of prompt_new_tokens]}`` over the rows with both
    estimates (docs/conversations.md, "Prompt-cache reuse"), found in the same scan (empty on a database
    before migration m010), and the overall quantiles when the guided path found them.

    ``group`` is the column the figures are per (``upstream``, ``instance`` for ``summary(by=...)``); the
    rollups keep only models, so another group is never guided."""
    present = columns_of(conn, "inference_metrics")
    where, params = _raw_where(since, until, f)

    def col(c: str) -> str:
        return c if c in present else "NULL"

    # The grouped scan groups by success too: its metric sums need no CASE per row (they are over successful
    # rows only); one query per group filters them (FILTER) instead, which costs less than sorting every row.
    sums = [
        "COUNT(*)",
        f"COALESCE(SUM({col('cancelled')} != 0), 0)",
        f"COALESCE(SUM({col('prompt_tokens')}), 0)",
        f"COALESCE(SUM({col('completion_tokens')}), 0)",
        f"COUNT({col('energy_j')})",
        f"TOTAL({col('energy_j')})",
    ]
    for m in METRICS:
        sums += [f"COUNT({col(m)})", f"TOTAL({col(m)})"]
    has_cache = "prompt_new_tokens" in present
    if has_cache:  # the rows with both estimates
        both = "prompt_cached_tokens IS NOT NULL AND prompt_new_tokens IS NOT NULL"
        sums += [f"SUM({both})"] + [f"SUM(CASE WHEN {both} THEN {c} END)" for c in _CACHE_COLUMNS]
    guided = guided and group == "model_name"
    guides = _guides(conn, since, until, f) if guided and set(METRICS) <= present else None
    fetch: list[str] = []
    if guides is not None:
        overall_guide = _merged_guide(guides.values())
        fetch = exact.fetch_columns(METRICS, exact.targets([*guides.values(), overall_guide], QUANTILES))
    cache: dict[str, list[int]] = {}
    fetched: dict[str, Sequence[Any]] = {}
    totals: dict[Any, list[Any]] = {}
    values = _group_values(conn, group, f, since, until)
    if values is not None:  # one query per group, each reading its rows in index order: no sort
        ok, failed = "success != 0", "(success != 0) IS NOT 1"
        aggs = ["COUNT(*)", f"COUNT(*) FILTER (WHERE {ok})"]
        aggs.append(f"COALESCE(SUM({col('cancelled')} != 0) FILTER (WHERE {failed}), 0)")
        aggs += sums[2:6]
        for m in METRICS:
            aggs += [f"COUNT({col(m)}) FILTER (WHERE {ok})", f"TOTAL({col(m)}) FILTER (WHERE {ok})"]
        aggs += sums[6 + 2 * len(METRICS) :]  # the prompt-cache sums, over every row as below
        n = len(aggs)
        sql = f"SELECT {', '.join(aggs + fetch)} FROM inference_metrics WHERE {group} IS ? AND {where}"
        # every aggregate adds up across time slices (counts and sums; the fetched values, storage/exact.py)
        kinds = [split_scan.SUM] * n + [split_scan.CONCAT, split_scan.SUM, split_scan.MIN, split_scan.MAX] * (
            len(fetch) // exact.COLUMNS_PER_METRIC
        )
        per_group = split_scan.group_rows(
            conn,
            sql,
            values,
            since,
            until,
            lambda lo, hi: _raw_where(lo, hi, f)[1],
            kinds,
            # the bounded count only where a helper could run at all
            parallel=split_scan.helpers() > 0 and not _rows_at_most(conn, since, until, _SPLIT_MIN_ROWS),
        )
        for value, row in zip(values, per_group, strict=True):
            if not row or not row[0]:
                continue
            key = _model_key(value)
            totals[value] = list(row[: 7 + 2 * len(METRICS)])  # add_counts' order, as below
            if row[1]:
                fetched[key] = row[n:]
            if has_cache and row[n - 3]:
                cache[key] = [int(row[n - 2]), int(row[n - 1])]
    else:
        sql = (
            f"SELECT {col(group)}, success != 0, {', '.join(sums + fetch)} FROM inference_metrics "
            f"WHERE {where} GROUP BY {col(group)}, success != 0"
        )
        for row in conn.execute(sql, params):
            key, ok_rows, counts = _model_key(row[0]), row[1], row[2 : 2 + len(sums)]
            t = totals.setdefault(row[0], [0] * (7 + 2 * len(METRICS)))
            # add_counts' order: requests, success, cancelled, prompt and completion tokens, energy n and
            # sum, then n and sum of each metric over successful requests
            t[0] += counts[0]
            t[1] += counts[0] if ok_rows else 0
            t[2] += 0 if ok_rows else counts[1]
            for k in range(2, 6):
                t[k + 1] += counts[k]
            if ok_rows:
                t[7 : 7 + 2 * len(METRICS)] = counts[6 : 6 + 2 * len(METRICS)]
                fetched[key] = row[2 + len(sums) :]
            if has_cache and counts[-3]:
                c = cache.setdefault(key, [0, 0])
                c[0] += int(counts[-2])
                c[1] += int(counts[-1])
    for name, t in totals.items():
        acc_for(name).add_counts(t)
        key = _model_key(name)
        if key not in fetched:  # no successful row: nothing to fetch, nothing to check but the counts
            fetched[key] = [None, 0, None, None] * len(METRICS)
    if guides is not None:
        sql_counts = {
            key: {m: (acc_for(key).agg.n[m], acc_for(key).agg.sums[m]) for m in METRICS} for key in fetched
        }
        found = exact.select(fetched, sql_counts, guides, overall_guide, METRICS, QUANTILES)
        if found is not None:
            per, top = found
            for key, known in per.items():
                acc_for(key).known = known
            return cache, top
    sql = (
        f"SELECT {col(group)}, {', '.join(col(m) for m in METRICS)} FROM inference_metrics "
        f"WHERE {where} AND success != 0 ORDER BY {col(group)}"
    )
    cursor = conn.execute(sql, params)
    while chunk := cursor.fetchmany(_CHUNK_ROWS):
        cols = list(zip(*chunk, strict=True))
        for name, run in groupby(range(len(chunk)), key=cols[0].__getitem__):
            rows = list(run)  # consecutive (ORDER BY the group)
            acc_for(name).add_values([c[rows[0] : rows[-1] + 1] for c in cols[1:]])
    return cache, None


def _guides(
    conn: sqlite3.Connection, since: float, until: float, f: Filters
) -> dict[str, exact.Guide] | None:
    """Per model, the rollups' histograms, counts and sums over the window (the guide of storage/exact.py);
    None when they cannot help: a user filter, no rollup tables, or under ``_GUIDED_MIN_S`` of whole minutes."""
    if f.raw_only or not columns_of(conn, "rollup_minute") or not columns_of(conn, "rollup_hour"):
        return None
    _, minutes, hours = _plan(since, until)
    if not hours and sum(end - start for start, end in minutes) < _GUIDED_MIN_S:
        return None
    accs: dict[str, Acc] = {}
    _rollups_into(conn, since, until, f, _acc_getter(accs, exact=False))
    return {
        key: {m: (_cumulative(a, m), a.agg.n[m], a.agg.sums[m]) for m in METRICS} for key, a in accs.items()
    }


def _cumulative(a: Acc, m: str) -> list[int]:
    """Running counts over every bucket index of ``a``'s histograms of ``m`` (blobs and raw counts)."""
    dense = [0] * BUCKETS
    for blob in a.blobs[m]:
        idx, cnt = decode(blob)
        for i, c in zip(idx, cnt, strict=True):
            dense[i] += c
    for i, c in a.hist[m].items():
        dense[i] += c
    return list(accumulate(dense))


def _merged_guide(guides: Iterable[exact.Guide]) -> exact.Guide:
    out: dict[str, tuple[Sequence[int], int, float]] = {m: ([0] * BUCKETS, 0, 0.0) for m in METRICS}
    for g in guides:
        for m in METRICS:
            cum, n, s = out[m]
            out[m] = (list(map(add, cum, g[m][0])), n + g[m][1], s + g[m][2])
    return out


def _rollups_into(
    conn: sqlite3.Connection, since: float, until: float, f: Filters, acc_for: Callable[[Any], Acc]
) -> None:
    """The window from rollups: raw partial minutes, whole minutes (whole 5 minutes where compacted),
    whole hours and whole days."""
    raw, minutes, hours = _plan(since, until)
    for lo, hi in raw:
        by_model: dict[Any, list[Any]] = {}
        for row in _raw_rows(conn, lo, hi, f):
            rows = by_model.get(row[1])
            if rows is None:
                by_model[row[1]] = [row]
            else:
                rows.append(row)
        for name, rows in by_model.items():
            acc_for(name).add_raw_rows(rows)
    hour_ranges, days = _split_days(conn, hours, f) if hours else ([], None)

    def add(r: sqlite3.Row) -> None:
        acc_for(r["model_name"]).add_rollup(r)

    five = rollup_day.FIVE_MINUTES  # whole 5 minutes of the last two days: compacted rows where usable
    minutes = [
        r for lo, hi in minutes for r in _compacted_into(conn, five, lo, hi, f, METRICS, add, per_model=True)
    ]
    for table, ranges in (("rollup_minute", minutes), ("rollup_hour", hour_ranges)):
        for start, end in ranges:
            for r in _rollup_rows(conn, table, start, end, f, per_model=True):
                acc_for(r["model_name"]).add_rollup(r)
    if days:
        start, end, usable = days
        for r in _rollup_rows(conn, rollup_day.TABLE, start, end, f, per_model=True):
            if r["bucket"] in usable:
                acc_for(r["model_name"]).add_rollup(r)


def summary(
    conn: sqlite3.Connection,
    since: float,
    until: float,
    filters: Filters | None = None,
    *,
    exact: bool | None = None,
    per_model: bool = True,
    guided: bool = True,
    by: str | None = None,
) -> dict[str, Any]:
    """Figures over [since, until) overall and per model, plus resource averages (docs/analytics.md).
    ``guided=False`` keeps an exact summary from using the rollups as a guide (tests compare both).
    ``by`` (a key of ``BY``) adds ``"by"`` and ``"groups"``: the same figures per upstream or instance,
    from raw rows (the rollups keep neither), so it makes the summary exact."""
    f = filters or Filters()
    if until <= since:
        raise QueryError("until", "must be later than since")
    if by is not None and by not in BY:
        raise QueryError("by", f"must be one of {', '.join(BY)}, got {by[:64]!r}")
    if exact is None:
        exact = (
            f.raw_only
            or by is not None
            or (until - since <= EXACT_MAX_WINDOW_S and _rows_at_most(conn, since, until, EXACT_MAX_ROWS))
        )
    elif not exact and (f.raw_only or by is not None):
        what, kept = (f"a {f.raw_param} filter", f.raw_param) if f.raw_only else (f"by={by}", by)
        raise QueryError("exact", f"{what} needs exact=true (rollups do not keep {kept}s)")
    by_model: dict[str, Acc] = {}
    acc_for = _acc_getter(by_model, exact)

    cache: dict[str, list[int]] = {}
    top: dict[str, dict[float, float | None]] | None = None
    # Without the models, a breakdown needs one scan only: its groups add up to the overall.
    group = BY[by] if by is not None and not per_model else "model_name"
    if exact:
        cache, top = _exact_into(conn, since, until, f, acc_for, guided=guided, group=group)
    else:
        _rollups_into(conn, since, until, f, acc_for)
    overall = Acc(exact)
    for model_acc in by_model.values():
        overall.merge(model_acc)
    if top is not None:
        overall.known = top
    # The rollups do not keep the cache estimates: the ratio is given only from raw rows (None otherwise).
    total = [sum(v[0] for v in cache.values()), sum(v[1] for v in cache.values())]
    seconds = until - since
    out: dict[str, Any] = {
        "window": {"since": iso_utc(since), "until": iso_utc(until), "seconds": seconds},
        "filters": f.as_dict(),
        "exact": exact,
        "overall": {**figures(overall, seconds), "cache_reuse_ratio": _reuse(total if cache else None)},
        "resources": resources(conn, since, until, overall),
    }
    if per_model:
        out["models"] = _listed("model", by_model, cache, seconds)
    if by is not None:
        accs, group_cache = (
            (by_model, cache) if group != "model_name" else _group_accs(conn, since, until, f, by)
        )
        out["by"], out["groups"] = by, _listed(by, accs, group_cache, seconds)
    return out


def _group_accs(
    conn: sqlite3.Connection, since: float, until: float, f: Filters, by: str
) -> tuple[dict[str, Acc], dict[str, list[int]]]:
    """Accumulators per value of ``BY[by]`` (rows without one form the group ``""``) and their cache sums:
    the per-model exact path, grouped by that column instead (same sums, same quantiles)."""
    accs: dict[str, Acc] = {}
    cache, _ = _exact_into(conn, since, until, f, _acc_getter(accs, exact=True), guided=False, group=BY[by])
    return accs, cache


def _listed(
    key: str, accs: dict[str, Acc], cache: dict[str, list[int]], seconds: float
) -> list[dict[str, Any]]:
    """Figures per group, most requests first; ``key`` names the group (model, upstream, instance)."""
    return [
        {key: name or None, **figures(a, seconds), "cache_reuse_ratio": _reuse(cache.get(name))}
        for name, a in sorted(accs.items(), key=lambda kv: (-kv[1].agg.requests, kv[0]))
    ]


def resources(conn: sqlite3.Connection, since: float, until: float, acc: Acc | None = None) -> dict[str, Any]:
    """Averages of the system and GPU samples in the window; null where the tables or columns are absent."""
    out: dict[str, Any] = {}
    lo, hi = iso_utc(since), iso_utc(until)
    wanted = {
        "system_metrics": {"cpu_percent": "cpu_percent_avg", "memory_percent": "memory_percent_avg"},
        "gpu_metrics": {
            "utilization_percent": "gpu_utilization_percent_avg",
            "memory_percent": "gpu_memory_percent_avg",
            "memory_used_mb": "gpu_memory_used_mb_avg",
            "power_w": "gpu_power_w_avg",
        },
    }
    for table, cols in wanted.items():
        present = columns_of(conn, table)
        usable = [c for c in cols if c in present] if "timestamp" in present else []
        values: Sequence[Any] = ()
        if usable:
            sql = ", ".join([*(f"AVG({c})" for c in usable), "COUNT(*)"])
            values = conn.execute(
                f"SELECT {sql} FROM {table} WHERE timestamp >= ? AND timestamp < ?", (lo, hi)
            ).fetchone()
        found = dict(zip(usable, values, strict=False))
        for c, name in cols.items():
            out[name] = found.get(c)
        out[f"{table.split('_')[0]}_samples"] = values[-1] if values else 0
    if acc is not None:
        a = acc.agg
        out["energy_j"] = a.energy_j_sum if a.energy_j_n else None
        out["energy_j_per_request_avg"] = a.energy_j_sum / a.energy_j_n if a.energy_j_n else None
    return out


def _compacted_into(
    conn: sqlite3.Connection,
    spec: rollup_day.Compacted,
    lo: int,
    hi: int,
    f: Filters,
    metrics: Sequence[str],
    add: Callable[[sqlite3.Row], None],
    *,
    per_model: bool,
) -> list[tuple[int, int]]:
    """``add`` every usable row of ``spec.table`` for the whole buckets inside [lo, hi); return the ranges
    still to read from its source table (the edges, and buckets not compacted or stale), in order."""
    first, end = -(-lo // spec.size) * spec.size, hi // spec.size * spec.size
    if first >= end:
        return [(lo, hi)] if lo < hi else []
    level, where, params = _level_where(f, per_model)
    usable = rollup_day.usable(conn, spec, first, end, level, where, params)
    if usable:
        for r in _rollup_rows(conn, spec.table, first, end, f, per_model=per_model, metrics=metrics):
            if r["bucket"] in usable:
                add(r)
    ranges: list[tuple[int, int]] = []
    for a, b in [(lo, first), *((x, x + spec.size) for x in range(first, end, spec.size)), (end, hi)]:
        if a >= b or (b - a == spec.size and a in usable):
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)  # consecutive ranges read as one
        else:
            ranges.append((a, b))
    return ranges


def _iso_whole(epoch_s: int) -> str:
    """``iso_utc`` of a whole second, without a datetime object (a 24 h trend at 1 m formats 1,440)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch_s))


def timeseries(
    conn: sqlite3.Connection,
    since: float,
    until: float,
    bucket: str,
    metrics: Sequence[str],
    filters: Filters | None = None,
    *,
    exact: bool = False,
) -> dict[str, Any]:
    """The figures ``metrics`` per UTC-aligned bucket of [since, until): rollups, or raw rows if ``exact``."""
    f = filters or Filters()
    size = BUCKET_SIZES.get(bucket)
    if size is None:
        raise QueryError("bucket", f"must be one of {', '.join(BUCKET_SIZES)}")
    unknown = [m for m in metrics if m not in FIGURES]
    if unknown or not metrics:
        raise QueryError("metric", f"unknown {', '.join(unknown) or '(none)'}; known: {', '.join(FIGURES)}")
    if until <= since:
        raise QueryError("until", "must be later than since")
    start = int(since // size) * size
    points = math.ceil((until - start) / size)
    if points > MAX_SERIES_POINTS:
        raise QueryError("bucket", f"{points} buckets is more than {MAX_SERIES_POINTS}; use a larger bucket")
    exact = exact or f.raw_only
    accs: dict[int, Acc] = {}

    def acc_at(b: int) -> Acc:
        a = accs.get(b)
        if a is None:
            a = accs[b] = Acc(exact)
        return a

    if exact:
        for row in _raw_rows(conn, start, until, f):
            minute = parse_ts(row[0])
            if minute is not None:
                acc_at(minute // size * size).add_raw(row)
    else:
        needed = sorted({m for name in metrics for m in _NEEDS[name]}, key=METRICS.index)
        table = "rollup_minute" if size < 3600 else "rollup_hour"
        # Buckets are whole seconds: the last one starts before ``until`` when it starts before its ceiling
        # (int() would drop the current bucket during its first second, and every request already in it).
        end = math.ceil(until)
        ranges = [(start, end)]
        if size == rollup_day.FIVE_MINUTES.size:  # compacted 5-minute rows where they still match

            def add(r: sqlite3.Row) -> None:
                acc_at(r["bucket"]).add_rollup(r, needed)

            five = rollup_day.FIVE_MINUTES
            ranges = _compacted_into(conn, five, start, end, f, needed, add, per_model=False)
        for lo, hi in ranges:
            for r in _rollup_rows(conn, table, lo, hi, f, per_model=False, metrics=needed):
                acc_at(r["bucket"] // size * size).add_rollup(r, needed)
    series = []
    for i in range(points):
        b = start + i * size
        seconds = min(size, until - b)
        a = accs.get(b) or Acc(exact)
        series.append({"bucket": _iso_whole(b), **figures(a, seconds, metrics)})
    return {
        "since": iso_utc(start),
        "until": iso_utc(until),
        "bucket": bucket,
        "bucket_seconds": size,
        "filters": f.as_dict(),
        "exact": exact,
        "metrics": list(metrics),
        "series": series,
    }
