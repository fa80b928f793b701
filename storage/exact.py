"""Exact percentiles of raw rows without fetching and sorting every value: the rollup histograms point at the
buckets that hold the wanted ranks, SQL returns only the raw values in those buckets, Python sorts those.

Why: an exact 1 h summary at 1M rows/day covers ~42,000 rows; fetching five metric columns of every
successful row into Python and sorting them was most of its time (docs/benchmarks.md, "Queries at 1M
rows"). The counts and sums stay SQL's (one grouped scan, storage/queries.py ``_exact_into``); this module
adds to that same scan, per metric, the values in the target buckets (by value range),
printed with 17 significant digits (``%!.17g`` round-trips a double exactly).

**Exact, or not used.** The histograms only guide: the rank ``r`` of a quantile lies in the bucket ``b``
where the guide's running count passes ``r``, and the answer is the ``r - below(b)``-th smallest raw value
in ``b``. That is exact when the guide counts the same rows as the raw window, which is checked for every
group and metric: the guide's count and sum equal SQL's over the raw rows, and the number of raw values
found in each target bucket equals the guide's count there. If any check fails (rows written without
rollups, rollups missing, a changed row), ``select`` returns None and the caller fetches every value as
before. Bucket 0 (values <= ``MIN_VALUE``, e.g. a gap of 0 ms) is answered from SQL's min and max of its
values when they are equal (every value there is that value), else not used either.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from storage.histogram import GAMMA, MAX_VALUE, MIN_VALUE, bucket_index, rank_positions

__all__ = ["COLUMNS_PER_METRIC", "Guide", "fetch_columns", "select", "targets"]

_TOP = bucket_index(MAX_VALUE)
_SLACK = 1e-9  # relative: an edge's value and the log Python buckets by round differently by ~1e-15
COLUMNS_PER_METRIC = 4  # values in the target buckets; count, min and max of the bucket-0 values
# metric -> (running counts over every bucket index, count, sum) of one group's rollups: the running
# counts of two groups add up element by element, and a rank's bucket is one bisection.
Guide = Mapping[str, tuple[Sequence[int], int, float]]


def targets(guides: Sequence[Guide], quantiles: Mapping[str, Sequence[float]]) -> dict[str, set[int]]:
    """Per metric, the buckets holding the ranks of ``quantiles`` in any of ``guides``."""
    out: dict[str, set[int]] = {m: set() for m in quantiles}
    for guide in guides:
        for m, qs in quantiles.items():
            cum, n, _ = guide[m]
            if n <= 0:
                continue
            for q in qs:
                lo, hi, _ = rank_positions(n, q)
                out[m].update((bisect_right(cum, lo), bisect_right(cum, hi)))
    return out


def _edge(b: int) -> float:
    """The upper edge of bucket ``b`` (>= 1): it holds (edge(b - 1), edge(b)]."""
    return MIN_VALUE * GAMMA**b


def fetch_columns(metrics: Sequence[str], wanted: Mapping[str, set[int]]) -> list[str]:
    """SQL aggregates (``COLUMNS_PER_METRIC`` per metric, in ``metrics`` order) over successful rows.

    The values are selected by value ranges, one per run of wanted buckets (two comparisons a range;
    ``ln`` per row cost 4x more), widened by ``_SLACK`` so a value an ulp across an edge is still fetched;
    Python's ``bucket_index`` decides which bucket each is in (and a value missed would fail the count
    check, never the answer). The bucket-0 aggregates are asked only where bucket 0 is wanted."""
    out = []
    for m in metrics:
        near = sorted(b for b in wanted.get(m, ()) if 1 <= b <= _TOP)
        runs: list[list[int]] = []
        for b in near:
            if runs and runs[-1][1] == b - 1:
                runs[-1][1] = b
            else:
                runs.append([b, b])
        ranges = []
        for first, last in runs:
            low = f"{m} > {(_edge(first - 1) if first > 1 else MIN_VALUE) * (1 - _SLACK)!r}"
            high = f"{m} <= {_edge(last) * (1 + _SLACK)!r}"
            ranges.append(f"({low} AND {high})" if last < _TOP else f"({low})")
        if ranges:
            out.append(
                f"group_concat(CASE WHEN success != 0 AND ({' OR '.join(ranges)}) THEN printf('%!.17g', {m}) END)"
            )
        else:
            out.append("NULL")
        if 0 in wanted.get(m, ()):
            zero = f"CASE WHEN success != 0 AND {m} <= {MIN_VALUE!r} THEN {m} END"
            out += [f"COUNT({zero})", f"MIN({zero})", f"MAX({zero})"]
        else:
            out += ["0", "NULL", "NULL"]
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-9


def select(
    groups: Mapping[str, Sequence[Any]],
    counts: Mapping[str, Mapping[str, tuple[int, float]]],
    guides: Mapping[str, Guide],
    overall: Guide,
    metrics: Sequence[str],
    quantiles: Mapping[str, Sequence[float]],
) -> tuple[dict[str, dict[str, dict[float, float | None]]], dict[str, dict[float, float | None]]] | None:
    """The exact quantiles per group and overall, or None when a check fails (module docstring).

    ``groups``: per group, the ``fetch_columns`` results; ``counts``: per group and metric, SQL's count and
    sum of the metric over successful rows; ``guides``: per group, the rollups' parts, count and sum."""
    if set(groups) != set(guides):
        return None
    per: dict[str, dict[str, dict[float, float | None]]] = {g: {} for g in groups}
    top: dict[str, dict[float, float | None]] = {}
    for j, m in enumerate(metrics):
        qs = quantiles.get(m, ())
        in_bucket: dict[str, dict[int, list[float]]] = {}
        zeros: dict[str, tuple[int, Any, Any]] = {}
        for g, cols in groups.items():
            n, total = counts[g][m]
            _, gn, gsum = guides[g][m]
            if n != gn or not _close(total, gsum):
                return None
            text, zn, zmin, zmax = cols[COLUMNS_PER_METRIC * j : COLUMNS_PER_METRIC * (j + 1)]
            found: dict[int, list[float]] = {}
            for v in map(float, text.split(",")) if text else ():
                found.setdefault(bucket_index(v), []).append(v)
            in_bucket[g] = found
            zeros[g] = (int(zn), zmin, zmax)
        union: dict[int, list[float]] = {}
        for found in in_bucket.values():
            for b, vals in found.items():
                union.setdefault(b, []).extend(vals)
        zn_all = sum(z[0] for z in zeros.values())
        lows = [z[1] for z in zeros.values() if z[0]]
        highs = [z[2] for z in zeros.values() if z[0]]
        zero_all = (zn_all, min(lows) if lows else None, max(highs) if highs else None)
        for g in groups:
            answer = _quantiles(guides[g][m], in_bucket[g], zeros[g], qs)
            if answer is None:
                return None
            per[g][m] = answer
        answer = _quantiles(overall[m], union, zero_all, qs)
        if answer is None:
            return None
        top[m] = answer
    return per, top


def _quantiles(
    guide: tuple[Sequence[int], int, float],
    found: dict[int, list[float]],
    zeros: tuple[int, Any, Any],
    qs: Sequence[float],
) -> dict[float, float | None] | None:
    cum, n, _ = guide
    out: dict[float, float | None] = {}
    sorted_in: dict[int, list[float]] = {}

    def value_at(rank: int) -> float | None:
        b = bisect_right(cum, rank)
        if b >= len(cum):  # the guide holds fewer values than the rank
            return None
        below = cum[b - 1] if b else 0
        expected = cum[b] - below
        if b == 0:  # every bucket-0 value is the same one, or we cannot tell the order
            zn, zmin, zmax = zeros
            if zn != expected or zmin is None or zmin != zmax:
                return None
            return float(zmin)
        vals = sorted_in.get(b)
        if vals is None:
            vals = sorted_in[b] = sorted(found.get(b, []))
        if len(vals) != expected or not 0 <= rank - below < len(vals):
            return None
        return vals[rank - below]

    for q in qs:
        if n <= 0:
            out[q] = None
            continue
        lo, hi, frac = rank_positions(n, q)
        v_lo, v_hi = value_at(lo), value_at(hi)
        if v_lo is None or v_hi is None:
            return None
        out[q] = v_lo + (v_hi - v_lo) * frac
    return out
