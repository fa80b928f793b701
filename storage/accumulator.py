"""``Acc``: what a summary or a trend bucket adds up (counts, sums, and exact values or histograms) and the
quantiles it answers; split from storage/queries.py, which builds and reads them.

Histograms are never merged eagerly: up to ``_MERGE_AT`` per metric are searched apart
(``histogram.parts_quantile``), more are added once into one dense histogram, so a 30-day summary or its
overall figures never add millions of bucket counts one by one (docs/benchmarks.md, "Queries at 1M rows").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from storage.histogram import (
    BUCKETS,
    Part,
    blob_part,
    blob_quantile,
    counts_part,
    decode,
    exact_quantile,
    parts_quantile,
)
from storage.rollups import METRICS, Agg, agg_of

__all__ = ["Acc"]

_ROLLUP_KEYS = {m: (f"{m}_n", f"{m}_sum", f"{m}_hist") for m in METRICS}
_MERGE_AT = 8  # histograms of one metric searched unmerged; more are added into one dense histogram


@dataclass(slots=True)
class Acc:
    """Counts and sums plus, per metric, either exact values or histograms, never merged: rollup blobs, a
    sparse histogram of raw rows, and parts (storage/histogram.py, ``parts_quantile``) made from both or
    taken from other accumulators."""

    exact: bool
    agg: Agg = field(default_factory=Agg)
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    hist: dict[str, dict[int, int]] = field(default_factory=lambda: {m: {} for m in METRICS})
    # rollup histograms not merged yet: a bucket with one row is answered from its blob directly
    blobs: dict[str, list[bytes]] = field(default_factory=lambda: {m: [] for m in METRICS})
    parts: dict[str, list[Part]] = field(default_factory=lambda: {m: [] for m in METRICS})
    # exact quantiles already found (storage/exact.py): metric -> {q: value}
    known: dict[str, dict[float, float | None]] = field(default_factory=dict)

    def add_raw(self, row: Sequence[Any]) -> None:
        """One raw row in ``RAW_COLUMNS`` order (load/unload rows already excluded)."""
        self.agg.add(row, hist=not self.exact)
        if not self.exact:
            self._fold_hists()
        elif row[3]:  # percentiles are over successful requests only
            for m, value in zip(METRICS, row[9:], strict=True):
                if value is not None:
                    self.values[m].append(float(value))

    def add_raw_rows(self, rows: list[Sequence[Any]]) -> None:
        """``add_raw`` of each row, a column at a time where histograms are kept (``rollups.agg_of``): the
        raw minutes at a rollup window's edges, hundreds of rows a summary."""
        if self.exact:
            for row in rows:
                self.add_raw(row)
            return
        self.agg.merge(agg_of(rows))
        self._fold_hists()

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

    def add_rollup(self, row: sqlite3.Row, metrics: Sequence[str] = METRICS) -> None:
        """One rollup row, selected with every count column and the columns of ``metrics``."""
        a = self.agg
        a.requests += row["requests"]
        a.success += row["success"]
        a.failed += row["failed"]
        a.cancelled += row["cancelled"]
        a.prompt_tokens += row["prompt_tokens"]
        a.completion_tokens += row["completion_tokens"]
        a.energy_j_n += row["energy_j_n"]
        a.energy_j_sum += row["energy_j_sum"]
        for m in metrics:
            n_col, sum_col, hist_col = _ROLLUP_KEYS[m]
            n = row[n_col]
            if n:
                a.n[m] += n
                a.sums[m] += row[sum_col]
                blob = row[hist_col]
                if blob:
                    self.blobs[m].append(blob)

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
            self.parts[m] += other._parts(m)  # shared, never copied: parts are not changed after

    def quantile(self, m: str, q: float) -> float | None:
        if self.exact:
            found = self.known.get(m)
            if found is not None and q in found:
                return found[q]
            vals = self.values[m]
            vals.sort()
            return exact_quantile(vals, q)
        blobs = self.blobs[m]
        if len(blobs) == 1 and not self.hist[m] and not self.parts[m]:
            return blob_quantile(blobs[0], q, self.agg.n[m])
        return parts_quantile(self._parts(m), q, self.agg.n[m])

    def _parts(self, m: str) -> list[Part]:
        """Every histogram of ``m`` as parts (pending blobs and raw counts turned into parts once). Past
        ``_MERGE_AT`` histograms they are added into one dense part instead: a quantile then costs one
        bisection, and an overall summary over several models searches a few parts, not hundreds."""
        parts, blobs, hist = self.parts[m], self.blobs[m], self.hist[m]
        if len(blobs) + len(parts) + (1 if hist else 0) > _MERGE_AT:
            dense = [0] * BUCKETS
            for blob in blobs:
                idx, cnt = decode(blob)
                for i, c in zip(idx, cnt, strict=True):
                    dense[i] += c
            for i, c in hist.items():
                dense[i] += c
            for part_idx, cum in parts:
                before = 0
                for i, c in zip(part_idx, cum, strict=True):
                    dense[i] += c - before
                    before = c
            parts[:] = [(range(BUCKETS), list(accumulate(dense)))]
            blobs.clear()
            self.hist[m] = {}
            return parts
        if blobs:
            parts += [blob_part(b) for b in blobs]
            blobs.clear()
        if hist:
            parts.append(counts_part(hist))
            self.hist[m] = {}
        return parts

    def mean(self, m: str) -> float | None:
        n = self.agg.n[m]
        return self.agg.sums[m] / n if n else None
