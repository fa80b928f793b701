"""Performance summaries and trends: the figures of docs/analytics.md over any window.

Two sources, same definitions. **Exact**: the raw ``inference_metrics`` rows of the window, percentiles from
the sorted values. **Rollups**: whole hours from ``rollup_hour``, whole minutes at the edges from
``rollup_minute``, and the partial minutes at the two ends from raw rows, so counts, sums and averages are
exact either way and only percentiles are estimated (within ``histogram.ALPHA``, 1%). ``"exact"`` in every
answer says which. Short windows (<= ``EXACT_MAX_WINDOW_S`` holding <= ``EXACT_MAX_ROWS`` rows) and anything
filtered by user (rollups have no users) are exact; the rest use rollups unless asked otherwise.
``cache_reuse_ratio`` (an estimate, docs/conversations.md) is given only by exact summaries: rollups do not
keep the cache columns.

Everything here is synchronous on a ``sqlite3.Connection`` (the API runs it on a thread with its own
read-only connection; the CLI opens the file directly).
"""

from __future__ import annotations

import math
import sqlite3
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from storage.histogram import BUCKETS, blob_quantile, decode, exact_quantile, hist_quantile, merge_into
from storage.model_names import canonical_model_name
from storage.records import iso_utc
from storage.rollups import METRICS, RAW_COLUMNS, Agg, parse_ts

__all__ = [
    "BUCKET_SIZES",
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
_EXCLUDE_LOADS = "(done_reason IS NULL OR done_reason NOT IN ('load', 'unload'))"


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", canonical_model_name(self.model))

    def as_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "endpoint": self.endpoint, "user": self.user}


@dataclass(slots=True)
class Acc:
    """Counts and sums plus, per metric, either exact values or dense histogram counts."""

    exact: bool
    agg: Agg = field(default_factory=Agg)
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    hist: dict[str, dict[int, int]] = field(default_factory=lambda: {m: {} for m in METRICS})
    # rollup histograms not merged yet: a bucket with one row is answered from its blob directly
    blobs: dict[str, list[bytes]] = field(default_factory=lambda: {m: [] for m in METRICS})

    def add_raw(self, row: Sequence[Any]) -> None:
        """One raw row in ``RAW_COLUMNS`` order (load/unload rows already excluded)."""
        self.agg.add(row, hist=not self.exact)
        if not self.exact:
            self._fold_hists()
        elif row[3]:  # percentiles are over successful requests only
            for m, value in zip(METRICS, row[9:], strict=True):
                if value is not None:
                    self.values[m].append(float(value))

    def add_counts(self, row: Sequence[Any]) -> None:
        """Counts and sums computed by SQL, in the order of ``_exact_into``'s query: requests, success,
        cancelled, prompt and completion tokens, energy n and sum, then n and sum of each metric over
        successful requests."""
        a = self.agg
        a.requests += row[0]
        a.success += row[1]
        a.cancelled += row[2]
        a.failed += row[0] - row[1] - row[2]
        a.prompt_tokens += row[3]
        a.completion_tokens += row[4]
        a.energy_j_n += row[5]
        a.energy_j_sum += row[6]
        for k, m in enumerate(METRICS):
            a.n[m] += row[7 + 2 * k]
            a.sums[m] += row[8 + 2 * k]

    def add_values(self, columns: Sequence[Sequence[Any]]) -> None:
        """The metric values (``METRICS`` order, one sequence each) of successful requests, NULLs included."""
        for m, col in zip(METRICS, columns, strict=True):
            self.values[m] += [v for v in col if v is not None]

    def _fold_hists(self) -> None:
        for m, h in self.agg.hists.items():
            if h:
                d = self.hist[m]
                for i, c in h.items():
                    d[i] = d.get(i, 0) + c
                h.clear()

    def add_rollup(self, row: sqlite3.Row) -> None:
        """One rollup row (selected with every count column and the wanted metric columns)."""
        a = self.agg
        a.requests += row["requests"]
        a.success += row["success"]
        a.failed += row["failed"]
        a.cancelled += row["cancelled"]
        a.prompt_tokens += row["prompt_tokens"]
        a.completion_tokens += row["completion_tokens"]
        a.energy_j_n += row["energy_j_n"]
        a.energy_j_sum += row["energy_j_sum"]
        keys = row.keys()
        for m in METRICS:
            if f"{m}_n" in keys and row[f"{m}_n"]:
                a.n[m] += row[f"{m}_n"]
                a.sums[m] += row[f"{m}_sum"]
                if row[f"{m}_hist"]:
                    self.blobs[m].append(row[f"{m}_hist"])

    def merge(self, other: Acc) -> None:
        a, b = self.agg, other.agg
        for c in ("requests", "success", "failed", "cancelled", "prompt_tokens", "completion_tokens"):
            setattr(a, c, getattr(a, c) + getattr(b, c))
        a.energy_j_n += b.energy_j_n
        a.energy_j_sum += b.energy_j_sum
        for m in METRICS:
            a.n[m] += b.n[m]
            a.sums[m] += b.sums[m]
            self.values[m] += other.values[m]
            if len(other.blobs[m]) > 1:
                other._collapse(m)  # merge its many rows once, then add the merged counts here
            d = self.hist[m]
            for j, count in other.hist[m].items():
                d[j] = d.get(j, 0) + count
            self.blobs[m] += other.blobs[m]

    def quantile(self, m: str, q: float) -> float | None:
        if self.exact:
            vals = self.values[m]
            vals.sort()
            return exact_quantile(vals, q)
        blobs = self.blobs[m]
        if len(blobs) == 1 and not self.hist[m]:
            return blob_quantile(blobs[0], q, self.agg.n[m])
        self._collapse(m)
        return hist_quantile(self.hist[m], q, self.agg.n[m])

    def _collapse(self, m: str) -> None:
        """Merge the pending rollup histograms of ``m`` into ``hist``: all their indices and counts read into
        two arrays, then added into a dense list (list indexing beats dict get/set: a 30-day summary adds
        ~2M bucket counts; docs/benchmarks.md, "Queries at 1M rows")."""
        blobs = self.blobs[m]
        if not blobs:
            return
        if len(blobs) == 1:
            merge_into(self.hist[m], blobs[0])
        else:
            dense = [0] * BUCKETS
            idx, cnt = array("H"), array("I")
            for blob in blobs:
                blob_idx, blob_cnt = decode(blob)
                idx += blob_idx
                cnt += blob_cnt
            for i, c in zip(idx, cnt, strict=True):
                dense[i] += c
            h = self.hist[m]
            for j, total in enumerate(dense):
                if total:
                    h[j] = h.get(j, 0) + total
        blobs.clear()

    def mean(self, m: str) -> float | None:
        n = self.agg.n[m]
        return self.agg.sums[m] / n if n else None


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
    for col, value in (("model_name", f.model), ("endpoint", f.endpoint), ("user_id", f.user)):
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


def _rows_at_most(conn: sqlite3.Connection, since: float, until: float, limit: int) -> bool:
    """Whether the window holds at most ``limit`` raw rows (a bounded index count: a few ms at most)."""
    sql = "SELECT COUNT(*) FROM (SELECT 1 FROM inference_metrics WHERE timestamp >= ? AND timestamp < ? LIMIT ?)"
    n = conn.execute(sql, (iso_utc(since), iso_utc(until), limit + 1)).fetchone()[0]
    return int(n) <= limit


def _model_key(name: Any) -> str:
    return name or ""


def _exact_into(
    conn: sqlite3.Connection, since: float, until: float, f: Filters, acc_for: Callable[[Any], Acc]
) -> dict[str, list[int]]:
    """An exact summary's per-model counts, sums and metric values: the counting and summing done by SQL (one
    grouped scan), then only the metric values of successful rows fetched, column by column, for the
    percentiles. Same figures as ``Acc.add_raw`` row by row, at a fraction of the Python work
    (docs/benchmarks.md, "Queries at 1M rows").

    Returns ``{model key: [sum of prompt_cached_tokens, sum of prompt_new_tokens]}`` over the rows with both
    estimates (docs/conversations.md, "Prompt-cache reuse"), found in the same scan; empty on a database
    before migration m010."""
    present = columns_of(conn, "inference_metrics")
    where, params = _raw_where(since, until, f)

    def col(c: str) -> str:
        return c if c in present else "NULL"

    sums = [
        "COUNT(*)",
        "COALESCE(SUM(success != 0), 0)",
        f"COALESCE(SUM(success = 0 AND {col('cancelled')} != 0), 0)",
        f"COALESCE(SUM({col('prompt_tokens')}), 0)",
        f"COALESCE(SUM({col('completion_tokens')}), 0)",
        f"COUNT({col('energy_j')})",
        f"TOTAL({col('energy_j')})",
    ]
    for m in METRICS:
        sums += [f"COUNT(CASE WHEN success THEN {col(m)} END)", f"TOTAL(CASE WHEN success THEN {col(m)} END)"]
    has_cache = "prompt_new_tokens" in present
    if has_cache:  # the rows with both estimates
        both = "prompt_cached_tokens IS NOT NULL AND prompt_new_tokens IS NOT NULL"
        sums += [f"SUM({both})"] + [f"SUM(CASE WHEN {both} THEN {c} END)" for c in _CACHE_COLUMNS]
    sql = f"SELECT model_name, {', '.join(sums)} FROM inference_metrics WHERE {where} GROUP BY model_name"
    cache: dict[str, list[int]] = {}
    for row in conn.execute(sql, params):
        acc_for(row[0]).add_counts(row[1:])
        if has_cache and row[-3]:
            cache[_model_key(row[0])] = [int(row[-2]), int(row[-1])]
    sql = (
        f"SELECT model_name, {', '.join(col(m) for m in METRICS)} FROM inference_metrics "
        f"WHERE {where} AND success ORDER BY model_name"
    )
    cursor = conn.execute(sql, params)
    while chunk := cursor.fetchmany(_CHUNK_ROWS):
        cols = list(zip(*chunk, strict=True))
        for name, run in groupby(range(len(chunk)), key=cols[0].__getitem__):
            rows = list(run)  # consecutive (ORDER BY model_name)
            acc_for(name).add_values([c[rows[0] : rows[-1] + 1] for c in cols[1:]])
    return cache


def summary(
    conn: sqlite3.Connection,
    since: float,
    until: float,
    filters: Filters | None = None,
    *,
    exact: bool | None = None,
    per_model: bool = True,
) -> dict[str, Any]:
    """Figures over [since, until) overall and per model, plus resource averages (docs/analytics.md)."""
    f = filters or Filters()
    if until <= since:
        raise QueryError("until", "must be later than since")
    if exact is None:
        exact = f.user is not None or (
            until - since <= EXACT_MAX_WINDOW_S and _rows_at_most(conn, since, until, EXACT_MAX_ROWS)
        )
    elif not exact and f.user is not None:
        raise QueryError("exact", "a user filter needs exact=true (rollups do not keep users)")
    by_model: dict[str, Acc] = {}

    def acc_for(name: Any) -> Acc:
        key = _model_key(name)
        a = by_model.get(key)
        if a is None:
            a = by_model[key] = Acc(exact)
        return a

    cache: dict[str, list[int]] = {}
    if exact:
        cache = _exact_into(conn, since, until, f, acc_for)
    else:
        raw, minutes, hours = _plan(since, until)
        for lo, hi in raw:
            for row in _raw_rows(conn, lo, hi, f):
                acc_for(row[1]).add_raw(row)
        for table, ranges in (("rollup_minute", minutes), ("rollup_hour", [hours] if hours else [])):
            for start, end in ranges:
                for r in _rollup_rows(conn, table, start, end, f, per_model=True):
                    acc_for(r["model_name"]).add_rollup(r)
    overall = Acc(exact)
    for model_acc in by_model.values():
        overall.merge(model_acc)
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
        out["models"] = [
            {"model": name or None, **figures(a, seconds), "cache_reuse_ratio": _reuse(cache.get(name))}
            for name, a in sorted(by_model.items(), key=lambda kv: (-kv[1].agg.requests, kv[0]))
        ]
    return out


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
    exact = exact or f.user is not None
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
        for r in _rollup_rows(conn, table, start, int(until), f, per_model=False, metrics=needed):
            acc_at(r["bucket"] // size * size).add_rollup(r)
    series = []
    for i in range(points):
        b = start + i * size
        seconds = min(size, until - b)
        a = accs.get(b) or Acc(exact)
        series.append({"bucket": iso_utc(b), **figures(a, seconds, metrics)})
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
