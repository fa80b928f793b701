"""Usage reports shared by the API and the CLI: the columns, CSV, quotas attached to rows, seeding quotas.

The report itself is storage's (storage/usage_reads.py); this module adds what belongs to the process: the
quota book's view of each key and team, and the CSV and table forms (``ollamon usage --format``,
``/ollamon/api/usage?format=csv``), which name their columns exactly as the JSON does.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from proxy.usage.quota import QuotaBook, period_starts, periods
from storage.usage_reads import UsageReads

__all__ = ["COLUMNS", "attach_quotas", "seed_book", "to_csv", "to_rows"]

# The figures of a report row, in column order (docs/usage.md, "Reports").
COLUMNS: tuple[str, ...] = (
    "requests",
    "failed",
    "rate_limited",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cloud_equiv_usd",
    "energy_j",
    "energy_cost_usd",
    "quota_used_percent",
)


def attach_quotas(report: dict[str, Any], book: QuotaBook) -> dict[str, Any]:
    """Add ``quotas`` (every quota with used/max per limit) and, on key and team rows, ``quota`` (that
    row's limits) and ``quota_used_percent`` (its highest share)."""
    report["quotas"] = book.report()
    by = report["by"]
    if by not in ("key", "team"):
        return report
    for row in report["rows"]:
        if by == "key" and row["key"] and row.get("key_name") is None:
            row["key_name"] = book.name_of(row["key"])  # keys from the config have no api_keys row
        limits = book.limits_of(by, row[by], row.get("key_name")) if row[by] else []
        if limits:
            row["quota"] = limits
            row["quota_used_percent"] = max(s["percent"] for s in limits)
    return report


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        # User ids and key names come from callers: a spreadsheet must not run one as a formula.
        return "'" + value
    return "" if value is None else value


def to_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (group rows, then ``(total)``) of a report, in ``COLUMNS`` order."""
    by = report["by"]
    head = [by, *(["key_name"] if by == "key" else []), *COLUMNS]
    rows = []
    for r in report["rows"]:
        rows.append([r[by], *([r.get("key_name")] if by == "key" else []), *(r.get(c) for c in COLUMNS)])
    total = report["total"]
    rows.append(["(total)", *([None] if by == "key" else []), *(total.get(c) for c in COLUMNS)])
    return head, rows


def to_csv(report: dict[str, Any]) -> str:
    """The report as CSV (RFC 4180, a header line, the total last). Floats with 6 decimals at most; a
    text cell starting with ``= + - @`` or a tab or CR gets a leading ``'`` (CSV formula injection)."""
    head, rows = to_rows(report)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(head)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return out.getvalue()


def seed_book(book: QuotaBook, reads: UsageReads, now: float) -> None:
    """Set the book's current day and month from the database (blocking: call it on a thread)."""
    if not book.quotas:
        return
    day_start, month_start = period_starts(now)
    day, month, _, _ = periods(now)
    for subject in ("key", "team"):
        for start, period in ((day_start, day), (month_start, month)):
            if now <= start:
                continue
            report = reads.usage(start, now, subject, limit=1_000_000)
            seeded = []
            for r in report["rows"]:
                if not r[subject]:
                    continue
                seeded.append((r[subject], period, float(r["total_tokens"]), float(r["cost_usd"])))
                if subject == "key" and r.get("key_name"):
                    book.name_key(r["key"], r["key_name"])
            book.seed(subject, seeded)
