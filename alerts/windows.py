"""In-memory rolling windows, fed by the records the writer stores and by sampler readings.

Why this shape: evaluation must stay cheap with many rules and heavy traffic, and must never scan the
database. Each model gets one-second buckets (counts, and per latency/speed column a count, a sum and a
histogram); for every window length the rules use, a ``Rolling`` keeps running totals of the buckets inside
it: a record is added to the totals once when it arrives and subtracted once when its bucket leaves the
window. Reading a window is then O(1) for counts and O(bins) for a percentile, whatever the traffic.

Figures mean what the summary's figures of the same name mean (docs/metrics.md): column statistics are over
successful requests, and percentiles use storage/histogram.py, ollamon's one quantile method, so a window's
``ttft_ms_p95`` is within ``histogram.error_bound`` of the exact one, as the summary's is. A request counts at
the moment its record reaches the writer's listener (it has finished), not at its start timestamp, so a long
request never lands in a bucket that already expired.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from typing import Any

from alerts.metrics import FIELDS, MetricSpec
from storage.histogram import bucket_index, hist_quantile
from storage.model_names import model_matches
from storage.records import InferenceRecord

__all__ = ["Fold", "GaugeWindows", "RequestWindows", "Totals", "column_figure"]

_NOT_INFERENCE = ("load", "unload")
_GLOB_CHARS = frozenset("*?[")
_NFIELDS = len(FIELDS)
_field_values = operator.attrgetter(*FIELDS)  # one C call per record instead of a getattr per column


class Totals:
    """Counts, and per column of ``FIELDS`` (successful requests only) a count, a sum and a histogram."""

    __slots__ = ("cancelled", "failed", "field_n", "field_sum", "hists", "n")

    def __init__(self) -> None:
        self.n = 0
        self.failed = 0
        self.cancelled = 0
        self.field_n = [0] * _NFIELDS
        self.field_sum = [0.0] * _NFIELDS
        self.hists: tuple[dict[int, int], ...] = tuple({} for _ in FIELDS)

    def merge(self, other: Totals) -> None:
        self.n += other.n
        self.failed += other.failed
        self.cancelled += other.cancelled
        for i in range(_NFIELDS):
            self.field_n[i] += other.field_n[i]
            self.field_sum[i] += other.field_sum[i]
        for mine, theirs in zip(self.hists, other.hists, strict=True):
            for b, c in theirs.items():
                mine[b] = mine.get(b, 0) + c

    def subtract(self, other: Totals) -> None:
        self.n -= other.n
        self.failed -= other.failed
        self.cancelled -= other.cancelled
        for i in range(_NFIELDS):
            self.field_n[i] -= other.field_n[i]
            self.field_sum[i] -= other.field_sum[i]
            if self.field_n[i] == 0:
                self.field_sum[i] = 0.0  # no float dust left behind
        for mine, theirs in zip(self.hists, other.hists, strict=True):
            for b, c in theirs.items():
                left = mine[b] - c
                if left:
                    mine[b] = left
                else:
                    del mine[b]


class _Bucket(Totals):
    __slots__ = ("sec",)

    def __init__(self, sec: int) -> None:
        super().__init__()
        self.sec = sec


# What one record adds: failed, cancelled, and (column index, value, histogram bucket) triples.
_Contribution = tuple[int, int, tuple[tuple[int, float, int], ...]]


def _add(t: Totals, c: _Contribution) -> None:
    t.n += 1
    t.failed += c[0]
    t.cancelled += c[1]
    hists, field_n, field_sum = t.hists, t.field_n, t.field_sum
    for i, v, b in c[2]:
        field_n[i] += 1
        field_sum[i] += v
        d = hists[i]
        d[b] = d.get(b, 0) + 1


class Fold:
    """What several records add, gathered once so that each bucket and window takes a whole batch in one
    step (a batch used to cost every record one ``_add`` per bucket and window of two series).

    Each column keeps its values in record order: ``add_fold`` sums them into a total in that order, the same
    float additions one by one gave, so a window's sums are bit for bit what per-record adds left.
    """

    __slots__ = ("cancelled", "failed", "hists", "n", "values")

    def __init__(self) -> None:
        self.n = 0
        self.failed = 0
        self.cancelled = 0
        self.values: tuple[list[float], ...] = tuple([] for _ in FIELDS)
        self.hists: tuple[dict[int, int], ...] = tuple({} for _ in FIELDS)

    def add(self, c: _Contribution) -> None:
        self.n += 1
        self.failed += c[0]
        self.cancelled += c[1]
        values, hists = self.values, self.hists
        for i, v, b in c[2]:
            values[i].append(v)
            d = hists[i]
            d[b] = d.get(b, 0) + 1


def _add_fold(t: Totals, f: Fold) -> None:
    t.n += f.n
    t.failed += f.failed
    t.cancelled += f.cancelled
    field_n, field_sum, hists = t.field_n, t.field_sum, t.hists
    for i, vals in enumerate(f.values):
        if vals:
            field_n[i] += len(vals)
            field_sum[i] = reduce(operator.add, vals, field_sum[i])  # left to right, as one by one
            mine = hists[i]
            for b, c in f.hists[i].items():
                mine[b] = mine.get(b, 0) + c


def contribution(rec: InferenceRecord) -> _Contribution | None:
    """What ``rec`` adds to a window; None for model load/unload calls (not inferences)."""
    if rec.done_reason in _NOT_INFERENCE:
        return None
    values: list[tuple[int, float, int]] = []
    if rec.success:  # latency and speed figures are over successful requests, as in the summary
        for i, v in enumerate(_field_values(rec)):
            if v is not None:
                f = float(v)
                values.append((i, f, bucket_index(f)))
    failed = 0 if (rec.success or rec.cancelled) else 1
    return failed, 1 if rec.cancelled else 0, tuple(values)


def column_figure(t: Totals, spec: MetricSpec) -> float | None:
    """A column figure (``ttft_ms_p95``, ``tokens_per_second_avg``) of ``t``; None when no request has the
    column."""
    n = t.field_n[spec.field]
    if n == 0:
        return None
    q = spec.quantile
    if q is None:
        return t.field_sum[spec.field] / n
    return hist_quantile(t.hists[spec.field], q, n)


class _Rolling:
    """Running totals of the buckets of one series within the last ``window_s`` seconds."""

    __slots__ = ("buckets", "totals", "window_s")

    def __init__(self, window_s: int) -> None:
        self.window_s = window_s
        self.buckets: deque[_Bucket] = deque()
        self.totals = Totals()

    def advance(self, now_sec: int) -> None:
        oldest = now_sec - self.window_s
        buckets = self.buckets
        while buckets and buckets[0].sec <= oldest:
            self.totals.subtract(buckets.popleft())


class _Series:
    __slots__ = ("head", "now_sec", "rollings")

    def __init__(self, windows: Sequence[int]) -> None:
        self.head: _Bucket | None = None
        self.now_sec = 0  # the last advance(): a bucket at or after it is inside every window
        self.rollings = {w: _Rolling(w) for w in windows}

    def _bucket(self, sec: int) -> _Bucket:
        # A record stamped before the last advance (clock skew) counts now, so it is never added to a
        # bucket that some window already let go of.
        sec = max(sec, self.now_sec)
        head = self.head
        if head is None or sec > head.sec:
            head = self.head = _Bucket(sec)
            for r in self.rollings.values():
                r.buckets.append(head)
        return head

    def add(self, sec: int, c: _Contribution) -> None:
        _add(self._bucket(sec), c)
        for r in self.rollings.values():
            _add(r.totals, c)

    def add_fold(self, sec: int, f: Fold) -> None:
        """``add`` for every record of ``f`` at once (they all finished in second ``sec``)."""
        _add_fold(self._bucket(sec), f)
        for r in self.rollings.values():
            _add_fold(r.totals, f)

    def empty(self) -> bool:
        return all(r.totals.n == 0 and not r.buckets for r in self.rollings.values())


class RequestWindows:
    """Per-model (and all-models) rolling request windows for a fixed set of window lengths."""

    def __init__(self, windows: Iterable[int]) -> None:
        self.windows = tuple(sorted(set(windows)))
        self._series: dict[str | None, _Series] = {}  # None: every model together
        self._cache: dict[tuple[str | None, int], Totals] = {}
        self.records = 0

    def add(self, rec: InferenceRecord, at: float) -> None:
        """Count ``rec`` as finished at Unix time ``at``."""
        if not self.windows:
            return
        c = contribution(rec)
        if c is None:
            return
        self.records += 1
        sec = int(at)
        for key in (None, rec.model_name or ""):
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(self.windows)
            series.add(sec, c)

    def add_batch(self, records: Iterable[object], at: float) -> None:
        """Count every inference record of ``records`` as finished at Unix time ``at``: the same totals as
        ``add`` one by one, for a fraction of the work (the writer's listener calls this once per batch)."""
        if not self.windows:
            return
        every = Fold()
        folds: dict[str, Fold] = {}
        for rec in records:
            if not isinstance(rec, InferenceRecord):
                continue
            c = contribution(rec)
            if c is None:
                continue
            every.add(c)
            key = rec.model_name or ""
            fold = folds.get(key)
            if fold is None:
                fold = folds[key] = Fold()
            fold.add(c)
        if not every.n:
            return
        self.records += every.n
        sec = int(at)
        self._fold_into(None, sec, every)
        for key, fold in folds.items():
            self._fold_into(key, sec, fold)

    def _fold_into(self, key: str | None, sec: int, fold: Fold) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self.windows)
        series.add_fold(sec, fold)

    def advance(self, now: float) -> None:
        """Drop what has left every window; forget models with nothing left. Call once per evaluation."""
        now_sec = int(now)
        idle = []
        for key, series in self._series.items():
            series.now_sec = max(series.now_sec, now_sec)
            for r in series.rollings.values():
                r.advance(now_sec)
            if key is not None and series.empty():
                idle.append(key)
        for key in idle:
            del self._series[key]
        self._cache.clear()

    def models(self, window_s: int, pattern: str | None = None) -> list[str]:
        """Models with at least one request in the window (matching ``pattern`` when given)."""
        out = []
        for key, series in self._series.items():
            if key is None or series.rollings[window_s].totals.n == 0:
                continue
            if pattern is None or _matches(key, pattern):
                out.append(key)
        return out

    def totals(self, window_s: int, model: str | None = None) -> Totals:
        """Totals of the window for one model, a glob of models, or (None) every model."""
        cache_key = (model, window_s)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        if model is None or not (_GLOB_CHARS & set(model)):
            series = self._series.get(model)
            out = series.rollings[window_s].totals if series is not None else Totals()
        else:
            out = Totals()
            for key, series in self._series.items():
                if key is not None and _matches(key, model):
                    out.merge(series.rollings[window_s].totals)
        self._cache[cache_key] = out
        return out


def _matches(name: str, pattern: str) -> bool:
    return model_matches(name, pattern)


class GaugeWindows:
    """Recent (time, value) readings per resource metric, kept for the longest window any rule uses."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._cache: dict[tuple[str, int, str], float | None] = {}

    def observe(self, values: Mapping[str, Any], at: float, accept: Iterable[str]) -> None:
        for name in accept:
            v = values.get(name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                continue  # absent this time (no GPU, a failed reading)
            dq = self._samples.get(name)
            if dq is None:
                dq = self._samples[name] = deque()
            dq.append((at, float(v)))
            cutoff = at - self.horizon_s
            while dq and dq[0][0] < cutoff:
                dq.popleft()

    def clear_cache(self) -> None:
        self._cache.clear()

    def value(self, name: str, window_s: int, agg: str, now: float) -> float | None:
        """``agg`` (avg, max, min, last, increase) of the readings in ``(now - window_s, now]``."""
        key = (name, window_s, agg)
        if key in self._cache:
            return self._cache[key]
        dq = self._samples.get(name)
        out: float | None = None
        if dq:
            start = now - window_s
            inside = [v for t, v in dq if start < t <= now]
            if inside:
                if agg == "avg":
                    out = sum(inside) / len(inside)
                elif agg == "max":
                    out = max(inside)
                elif agg == "min":
                    out = min(inside)
                elif agg == "last":
                    out = inside[-1]
                else:  # increase of a counter: last reading minus the last one before the window
                    before = [v for t, v in dq if t <= start]
                    base = before[-1] if before else inside[0]
                    out = max(0.0, inside[-1] - base)
        self._cache[key] = out
        return out
