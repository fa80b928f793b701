"""Usage reports: requests, tokens, cost and energy per API key, team, model or user over any window.

Two sources, same figures (the ``SUMS`` of storage/usage_rollup.py). Whole UTC hours of the window come
from ``usage_hour``, which the writer fills in the same transaction as the raw rows, so they survive raw
retention for as long as rollups are kept; the partial hours at the two ends come from raw
``inference_metrics`` rows. Inside raw retention the totals therefore equal the sums of the raw rows; beyond
it they equal the hourly rows (the partial hour at the far end is then gone with its raw rows, and the
answer's ``sources`` says which hours were read where). Load/unload rows are not inferences and not counted.

``UsageReads`` is ``storage.reads.Reads`` with the ``usage`` read added (same connection handling).
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

from storage.queries import columns_of
from storage.reads import Reads
from storage.records import iso_utc
from storage.usage_rollup import REFUSED, SUMS, served_sums

__all__ = ["BY", "MAX_ROWS", "UsageReads", "usage"]

# ?by= -> the dimension column
BY: dict[str, str] = {"key": "api_key_id", "team": "team", "model": "model_name", "user": "user_id"}
MAX_ROWS = 10_000
_EXCLUDE_LOADS = "(done_reason IS NULL OR done_reason NOT IN ('load', 'unload'))"
_FLOATS = frozenset({"cost_usd", "cloud_equiv_usd", "energy_j", "energy_cost_usd"})


def _raw_sums(present: set[str]) -> str:
    """The ``SUMS`` over raw rows, as ``usage_hour`` adds them (a refused row adds no tokens or cost)."""
    counts = [
        "COUNT(*)",
        "TOTAL(success = 0 AND cancelled = 0)",
        f"TOTAL(COALESCE(status_code, 0) = {REFUSED})",
    ]
    return ", ".join([*counts, *served_sums(present)])


def _add(acc: dict[str, list[float]], key: str, values: Any) -> None:
    row = acc.get(key)
    if row is None:
        row = acc[key] = [0.0] * len(SUMS)
    for i, v in enumerate(values):
        row[i] += v or 0


def _figures(sums: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {c: (v if c in _FLOATS else int(v)) for c, v in zip(SUMS, sums, strict=True)}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def usage(conn: sqlite3.Connection, since: float, until: float, by: str, limit: int = 1000) -> dict[str, Any]:
    """Usage over [since, until) grouped by ``by`` (key, team, model or user); ``limit`` groups at most,
    largest cost first (the total counts every group)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    if until <= since:
        raise ValueError("until must be later than since")
    dim = BY[by]
    present = columns_of(conn, "inference_metrics")
    has_hours = bool(columns_of(conn, "usage_hour"))
    h0, h1 = math.ceil(since / 3600) * 3600, math.floor(until / 3600) * 3600
    if not has_hours or h0 >= h1:
        raw, hours = [(since, until)], None
    else:
        raw = ([(since, float(h0))] if since < h0 else []) + ([(float(h1), until)] if h1 < until else [])
        hours = (h0, h1)
    acc: dict[str, list[float]] = {}
    key_sql = f"COALESCE({dim}, '')" if dim in present else "''"
    for lo, hi in raw:
        sql = (
            f"SELECT {key_sql}, {_raw_sums(present)} FROM inference_metrics "
            f"WHERE timestamp >= ? AND timestamp < ? AND {_EXCLUDE_LOADS} GROUP BY 1"
        )
        for row in conn.execute(sql, (iso_utc(lo), iso_utc(hi))):
            _add(acc, row[0], row[1:])
    if hours is not None:
        sums = ", ".join(f"TOTAL({c})" for c in SUMS)
        sql = f"SELECT {dim}, {sums} FROM usage_hour WHERE bucket >= ? AND bucket < ? GROUP BY 1"
        for row in conn.execute(sql, hours):
            _add(acc, row[0], row[1:])
    total = [0.0] * len(SUMS)
    for sums_of in acc.values():
        total = [a + b for a, b in zip(total, sums_of, strict=True)]
    ordered = sorted(
        acc.items(), key=lambda kv: (-kv[1][SUMS.index("cost_usd")], -kv[1][3] - kv[1][4], kv[0])
    )
    rows = [{by: name or None, **_figures(s)} for name, s in ordered[:limit]]
    if by == "key":
        names = _key_names(conn, [r["key"] for r in rows if r["key"]])
        for r in rows:
            r["key_name"] = names.get(r["key"]) if r["key"] else None
    return {
        "window": {"since": iso_utc(since), "until": iso_utc(until), "seconds": until - since},
        "by": by,
        "sources": {
            "raw": [[iso_utc(lo), iso_utc(hi)] for lo, hi in raw],
            "hours": [iso_utc(hours[0]), iso_utc(hours[1])] if hours else None,
        },
        "groups": len(acc),
        "truncated": len(acc) > limit,
        "total": _figures(total),
        "rows": rows,
    }


def _key_names(conn: sqlite3.Connection, ids: list[str]) -> dict[str, str]:
    """API key id -> name, from the ``api_keys`` table when it exists (keys from config have no row)."""
    if not ids or not {"id", "name"} <= columns_of(conn, "api_keys"):
        return {}
    out: dict[str, str] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        sql = f"SELECT id, name FROM api_keys WHERE id IN ({', '.join('?' * len(chunk))})"
        out.update({str(r[0]): str(r[1]) for r in conn.execute(sql, chunk)})
    return out


def used_since(
    conn: sqlite3.Connection, since: float, until: float, by: str
) -> dict[str, tuple[float, float]]:
    """Tokens and cost per key id (``by="key"``) or team over [since, until): what a quota has used."""
    out: dict[str, tuple[float, float]] = {}
    report = usage(conn, since, until, by, limit=MAX_ROWS * 10)
    for r in report["rows"]:
        if r[by]:
            out[r[by]] = (float(r["total_tokens"]), float(r["cost_usd"]))
    return out


class UsageReads(Reads):
    """``Reads`` plus the usage report (the API runs these on a thread; the CLI calls them directly)."""

    def usage(self, since: float, until: float, by: str, limit: int = 1000) -> dict[str, Any]:
        return self._call(lambda conn: usage(conn, since, until, by, limit))

    def used_since(self, since: float, until: float, by: str) -> dict[str, tuple[float, float]]:
        return self._call(lambda conn: used_since(conn, since, until, by))
