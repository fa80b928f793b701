"""Read queries over ``content_analysis``: rates per model, key or user (docs/content.md).

* ``analysed``: rows in the window (status ok, failed or skipped); ``failed``: rows with status failed.
* ``unsafe_rate``: unsafe verdicts / rows with a verdict (None when the guard judged none).
* ``pii_rate``: rows with at least one PII item in prompt or response / rows where PII was checked.
* ``languages``: prompt languages with their counts, most frequent first.

The window is on the request's own ``timestamp``; model, key and user come from ``inference_metrics``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from storage.records import iso_utc

__all__ = ["GROUPS", "MAX_GROUPS", "content_summary"]

GROUPS = {"model": "m.model_name", "key": "m.api_key_id", "user": "m.user_id"}
MAX_GROUPS = 100
_FIGURES = """
    COUNT(*) AS analysed,
    SUM(c.status = 'failed') AS failed,
    SUM(c.verdict IS NOT NULL) AS judged,
    SUM(c.verdict = 'unsafe') AS unsafe,
    SUM(c.pii_count IS NOT NULL) AS pii_checked,
    SUM(c.pii_count > 0) AS with_pii,
    AVG(c.toxicity) AS toxicity_mean,
    AVG(c.sentiment) AS sentiment_mean,
    AVG(c.guard_latency_ms) AS guard_latency_ms_mean
"""


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    judged, checked = row.pop("judged") or 0, row.pop("pii_checked") or 0
    unsafe, with_pii = row.pop("unsafe") or 0, row.pop("with_pii") or 0
    row["failed"] = row["failed"] or 0
    row["unsafe"], row["judged"] = unsafe, judged
    row["unsafe_rate"] = round(unsafe / judged, 6) if judged else None
    row["with_pii"] = with_pii
    row["pii_rate"] = round(with_pii / checked, 6) if checked else None
    return row


def _languages(conn: sqlite3.Connection, where: str, params: list[Any], group: str | None) -> dict[Any, Any]:
    key = f"{group} AS grp, " if group else "NULL AS grp, "
    sql = (
        f"SELECT {key}c.prompt_language AS lang, COUNT(*) AS n FROM content_analysis c "
        f"LEFT JOIN inference_metrics m ON m.request_id = c.request_id WHERE {where} "
        f"AND c.prompt_language IS NOT NULL GROUP BY grp, lang ORDER BY n DESC, lang"
    )
    out: dict[Any, dict[str, int]] = {}
    for grp, lang, n in conn.execute(sql, params):
        out.setdefault(grp, {})[lang] = n
    return out


def content_summary(conn: sqlite3.Connection, since: float, until: float, by: str | None) -> dict[str, Any]:
    """Figures over [since, until), overall and (``by`` in GROUPS) per group, largest groups first."""
    where = "c.timestamp >= ? AND c.timestamp < ?"
    params: list[Any] = [iso_utc(since), iso_utc(until)]
    conn.row_factory = sqlite3.Row
    join = "FROM content_analysis c LEFT JOIN inference_metrics m ON m.request_id = c.request_id"
    overall = _rates(dict(conn.execute(f"SELECT {_FIGURES} {join} WHERE {where}", params).fetchone()))
    overall["languages"] = _languages(conn, where, params, None).get(None, {})
    body: dict[str, Any] = {"since": params[0], "until": params[1], "overall": overall}
    if by is not None:
        group = GROUPS[by]
        rows = conn.execute(
            f"SELECT {group} AS grp, {_FIGURES} {join} WHERE {where} GROUP BY grp "
            f"ORDER BY analysed DESC, grp NULLS FIRST LIMIT {MAX_GROUPS}",
            params,
        ).fetchall()
        langs = _languages(conn, where, params, group)
        groups = []
        for r in rows:
            row = dict(r)
            grp = row.pop("grp")
            groups.append({by: grp, **_rates(row), "languages": langs.get(grp, {})})
        body["by"], body["groups"] = by, groups
    return body
