"""ollamon's one quantile method: a fixed log-scale histogram (a DDSketch) and the quantile it estimates.

Every percentile ollamon reports goes through this module: the per-request ITL p95 (proxy/forward/capture.py),
the alert windows (alerts/windows.py), and the summaries and rollups (storage/queries.py, storage/rollups.py).
docs/metrics.md ("Quantiles") states the definition and the bound for users; tests/test_sketch.py checks both.

**The definition.** The ``q`` quantile of ``n`` sorted values ``x[0..n-1]`` is the linear interpolation between
the two closest ranks: ``h = (n-1)q``, ``x[floor(h)] + (h - floor(h)) (x[floor(h)+1] - x[floor(h)])`` (numpy's
default, ``statistics.quantiles(method="inclusive")``). ``exact_quantile`` computes it from the values.

**The sketch.** Fixed, so histograms written at any time, by any process, merge by adding counts. Bucket
``i >= 1`` holds the values in ``(MIN_VALUE * GAMMA**(i-1), MIN_VALUE * GAMMA**i]`` and stands for
``MIN_VALUE * GAMMA**i * 2 / (1 + GAMMA)``; with ``GAMMA = (1 + ALPHA) / (1 - ALPHA)`` that representative is
within ``ALPHA`` (1%) of anything in the bucket (the DDSketch construction). Bucket 0 holds values
``<= MIN_VALUE`` (0.001 ms or tokens/s, gaps of 0 and negative values included) and stands for 0. Values above
``MAX_VALUE`` (1e9, i.e. 11.6 days in ms) are clamped into the top bucket.

**The bound.** For values in ``[0, MAX_VALUE]``, ``|hist_quantile - exact_quantile| <= ALPHA * exact_quantile
+ MIN_VALUE`` (``error_bound``). Why: the bucket map is monotone, so each of the two order statistics lies in
the bucket where the cumulative count passes its rank, and that bucket's representative is within ``ALPHA``
of it (``MIN_VALUE`` absolute in bucket 0); the interpolated quantile is a convex combination of the two, so
it keeps the bound.

Serialised form (a BLOB): ``n`` little-endian uint16 bucket indices, then ``n`` little-endian uint32 counts,
indices ascending, zero counts omitted.
"""

from __future__ import annotations

import math
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from itertools import accumulate

__all__ = [
    "ALPHA",
    "BUCKETS",
    "GAMMA",
    "MAX_VALUE",
    "MIN_VALUE",
    "Part",
    "blob_part",
    "blob_quantile",
    "bucket_index",
    "bucket_indices",
    "bucket_value",
    "counts_of",
    "counts_part",
    "decode",
    "encode",
    "error_bound",
    "exact_quantile",
    "hist_quantile",
    "merge_blobs",
    "merge_into",
    "parts_quantile",
]

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
MIN_VALUE = 1e-3
MAX_VALUE = 1e9
_LOG_GAMMA = math.log(GAMMA)
_TOP = math.ceil(math.log(MAX_VALUE / MIN_VALUE) / _LOG_GAMMA)
BUCKETS = _TOP + 1  # indices 0.._TOP
_REP_FACTOR = 2.0 / (1.0 + GAMMA)
_REPS = [0.0] + [MIN_VALUE * GAMMA**i * _REP_FACTOR for i in range(1, BUCKETS)]
_SWAP = sys.byteorder == "big"

assert array("H").itemsize == 2 and array("I").itemsize == 4, "this platform's array sizes are unusual"


_LOG_MIN = math.log(MIN_VALUE)
_INV_LOG_GAMMA = 1.0 / _LOG_GAMMA


def bucket_index(value: float) -> int:
    """The bucket holding ``value`` (0 for values <= MIN_VALUE, clamped at the top). Hot: the writer calls
    it for every metric of every request, hence the flat arithmetic."""
    if value > MIN_VALUE:  # False for NaN too
        if value < MAX_VALUE:
            i = math.ceil((math.log(value) - _LOG_MIN) * _INV_LOG_GAMMA)
            return i if i >= 1 else 1
        return _TOP
    return 0


def bucket_indices(values: Sequence[float]) -> list[int]:
    """``[bucket_index(v) for v in values]``, the same arithmetic without a call per value when every value
    lies in (MIN_VALUE, MAX_VALUE) (~30% faster; the rollup writer buckets whole columns)."""
    if values and min(values) > MIN_VALUE and max(values) < MAX_VALUE:
        try:
            out = [math.ceil((math.log(v) - _LOG_MIN) * _INV_LOG_GAMMA) for v in values]
        except ValueError:  # a NaN (min and max pass over NaNs after the first element)
            return list(map(bucket_index, values))
        return out if min(out) >= 1 else [i if i >= 1 else 1 for i in out]
    return list(map(bucket_index, values))


def bucket_value(index: int) -> float:
    """The value that bucket ``index`` stands for."""
    return _REPS[index]


def encode(counts: Mapping[int, int]) -> bytes:
    """Serialise ``{bucket index: count}``; zero counts are left out."""
    keys = sorted(k for k, c in counts.items() if c)
    idx = array("H", keys)
    cnt = array("I", (counts[k] for k in keys))
    if _SWAP:
        idx.byteswap()
        cnt.byteswap()
    return idx.tobytes() + cnt.tobytes()


def decode(blob: bytes) -> tuple[array[int], array[int]]:
    """The (indices, counts) arrays of a serialised histogram."""
    n = len(blob) // 6
    idx = array("H")
    idx.frombytes(blob[: 2 * n])
    cnt = array("I")
    cnt.frombytes(blob[2 * n : 6 * n])
    if _SWAP:
        idx.byteswap()
        cnt.byteswap()
    return idx, cnt


def merge_into(acc: dict[int, int], blob: bytes | None) -> None:
    """Add a serialised histogram into ``acc`` (sparse ``{bucket index: count}``)."""
    if not blob:
        return
    idx, cnt = decode(blob)
    get = acc.get
    for i, c in zip(idx, cnt, strict=True):
        acc[i] = get(i, 0) + c


def merge_blobs(a: bytes | None, b: bytes | None) -> bytes | None:
    """Sum of two serialised histograms (SQL function ``ollamon_hist_merge`` in rollup upserts)."""
    if not a:
        return b
    if not b:
        return a
    out: dict[int, int] = {}
    for blob in (a, b):
        idx, cnt = decode(blob)
        for i, c in zip(idx, cnt, strict=True):
            out[i] = out.get(i, 0) + c
    return encode(out)


def counts_of(values: Iterable[float]) -> dict[int, int]:
    """``{bucket index: count}`` of ``values``."""
    out: dict[int, int] = {}
    for v in values:
        i = bucket_index(v)
        out[i] = out.get(i, 0) + 1
    return out


def error_bound(exact: float) -> float:
    """How far ``hist_quantile`` may be from ``exact_quantile`` = ``exact`` (values in [0, MAX_VALUE])."""
    return (ALPHA + 1e-9) * abs(exact) + MIN_VALUE  # 1e-9: float rounding at a bucket's edge


def rank_positions(n: int, q: float) -> tuple[int, int, float]:
    """The two ranks (0-based) a quantile interpolates between, and the weight of the second."""
    h = (n - 1) * q
    lo = math.floor(h)
    return lo, min(lo + 1, n - 1), h - lo


def exact_quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation quantile of already sorted values (numpy's default); None when empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    lo, hi, frac = rank_positions(n, q)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _quantile_from(idx: Sequence[int], cnt: Sequence[int], q: float, total: int) -> float | None:
    """Quantile from bucket indices in ascending order and their counts (C-speed: accumulate + bisect)."""
    if total <= 0:
        return None
    cum = list(accumulate(cnt))
    lo, hi, frac = rank_positions(total, q)
    v_lo = _REPS[idx[bisect_right(cum, lo)]]
    v_hi = _REPS[idx[bisect_right(cum, hi)]]
    return v_lo + (v_hi - v_lo) * frac


def hist_quantile(counts: Mapping[int, int], q: float, total: int | None = None) -> float | None:
    """The same quantile estimated from sparse bucket counts ``{bucket index: count}``; None when empty."""
    keys = sorted(k for k, c in counts.items() if c)
    n = sum(counts[k] for k in keys) if total is None else total
    return _quantile_from(keys, [counts[k] for k in keys], q, n)


def blob_quantile(blob: bytes, q: float, total: int) -> float | None:
    """The quantile of one serialised histogram, without building a mapping (one rollup row per bucket)."""
    idx, cnt = decode(blob)
    return _quantile_from(idx, cnt, q, total)


# Quantiles of many histograms without merging them: each one a "part" (its ascending bucket indices and
# running counts); the bucket holding a rank is found by bisecting on the bucket index, counting each part
# with one C ``bisect`` per step. About 11 steps x parts per rank, instead of one Python addition per bucket
# count of every histogram (a 30-day summary adds millions; docs/benchmarks.md, "Queries at 1M rows").
Part = tuple[Sequence[int], Sequence[int]]


def blob_part(blob: bytes) -> Part:
    """A serialised histogram as a part: its bucket indices and their running counts."""
    idx, cnt = decode(blob)
    return idx, list(accumulate(cnt))


def counts_part(counts: Mapping[int, int]) -> Part:
    """Sparse ``{bucket index: count}`` as a part."""
    keys = sorted(k for k, c in counts.items() if c)
    return keys, list(accumulate(counts[k] for k in keys))


def count_to(parts: Sequence[Part], bucket: int) -> int:
    """How many values of all ``parts`` lie in buckets <= ``bucket``."""
    total = 0
    for idx, cum in parts:
        k = bisect_right(idx, bucket)
        if k:
            total += cum[k - 1]
    return total


def _bucket_of_rank(parts: Sequence[Part], rank: int, lo: int, hi: int) -> int:
    """The smallest bucket in [lo, hi] holding more than ``rank`` values at or below it (``hi`` if none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if count_to(parts, mid) > rank:
            hi = mid
        else:
            lo = mid + 1
    return lo


def bucket_of_rank(parts: Sequence[Part], rank: int) -> int:
    """The bucket where the running count of all ``parts`` passes ``rank`` (0-based)."""
    filled = [p for p in parts if len(p[0])]
    if not filled:
        return 0
    return _bucket_of_rank(filled, rank, min(p[0][0] for p in filled), max(p[0][-1] for p in filled))


def parts_quantile(parts: Sequence[Part], q: float, total: int) -> float | None:
    """``hist_quantile`` of the histogram the ``parts`` add up to, without adding them: the same bucket (the
    first where the running count passes the rank), hence the same value."""
    filled = [p for p in parts if len(p[0])]
    if total <= 0 or not filled:
        return None
    lo_rank, hi_rank, frac = rank_positions(total, q)
    first = min(p[0][0] for p in filled)
    last = max(p[0][-1] for p in filled)
    b_lo = _bucket_of_rank(filled, lo_rank, first, last)
    b_hi = b_lo if count_to(filled, b_lo) > hi_rank else _bucket_of_rank(filled, hi_rank, b_lo + 1, last)
    v_lo, v_hi = _REPS[b_lo], _REPS[b_hi]
    return v_lo + (v_hi - v_lo) * frac
