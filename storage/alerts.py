"""The ``alerts`` and ``alert_transitions`` tables (migration m004_alerts): their SQL, and nothing else.

Reads take a ``sqlite3.Connection`` or PostgreSQL's stand-in (``storage.reads.Reads`` opens it); writes are
write jobs, written once for both backends (storage/portable.py), that run in the writer task (``save_alert`` and ``record_delivery`` queue them through ``Writer.execute_write``), so
an alert transition is one short transaction between two record batches, never beside one. The alert
engine's own types stay in ``alerts/``: here an alert is the dict of its columns.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import Any

import aiosqlite

from storage.base import WriteExecutor
from storage.portable import portable

__all__ = [
    "ALERT_FIELDS",
    "LIST_STATES",
    "get_alert",
    "last_announced",
    "list_alerts",
    "open_alerts",
    "record_delivery",
    "requests_since",
    "save_alert",
]

LIST_STATES: dict[str, tuple[str, ...]] = {
    "firing": ("firing",),
    "pending": ("pending",),
    "resolved": ("resolved",),
    "open": ("pending", "firing"),
    "all": ("pending", "firing", "resolved", "inactive"),
}
# The columns an engine save sets (labels as a dict; the rest as stored: text times, numbers).
ALERT_FIELDS = (
    "rule",
    "fingerprint",
    "labels",
    "severity",
    "state",
    "value",
    "threshold",
    "message",
    "started_at",
    "fired_at",
    "resolved_at",
    "last_notified_at",
    "announced_at",
    "notification_count",
)


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["labels"] = json.loads(row["labels"])
    return row


# -- reads -----------------------------------------------------------------------------------------


def list_alerts(conn: sqlite3.Connection, state: str, limit: int) -> list[dict[str, Any]]:
    """Alerts in ``state`` (a key of ``LIST_STATES``), newest first, labels decoded."""
    if state not in LIST_STATES:
        raise ValueError(f"state must be one of {', '.join(LIST_STATES)}, not {state!r}")
    states = LIST_STATES[state]
    marks = ",".join("?" * len(states))
    sql = f"SELECT * FROM alerts WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?"
    return [_decode(r) for r in _rows(conn, sql, [*states, int(limit)])]


def get_alert(conn: sqlite3.Connection, alert_id: int) -> dict[str, Any] | None:
    """One alert with its ``transitions``, oldest first; None when there is no such alert."""
    rows = _rows(conn, "SELECT * FROM alerts WHERE id = ?", [alert_id])
    if not rows:
        return None
    row = _decode(rows[0])
    row["transitions"] = _rows(
        conn,
        "SELECT at, from_state, to_state, value FROM alert_transitions WHERE alert_id = ? ORDER BY id",
        [alert_id],
    )
    return row


def open_alerts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Pending and firing alerts, oldest first."""
    rows = _rows(conn, "SELECT * FROM alerts WHERE state IN ('pending', 'firing') ORDER BY id", [])
    return [_decode(r) for r in rows]


def last_announced(conn: sqlite3.Connection) -> dict[tuple[str, str], str]:
    """When each (rule, fingerprint) was last announced firing (ISO-8601 UTC)."""
    rows = _rows(
        conn,
        "SELECT rule, fingerprint, max(announced_at) AS at FROM alerts "
        "WHERE announced_at IS NOT NULL GROUP BY rule, fingerprint",
        [],
    )
    return {(r["rule"], r["fingerprint"]): r["at"] for r in rows}


def requests_since(conn: sqlite3.Connection, since_iso: str) -> list[dict[str, Any]]:
    """The request fields the alert windows use, for requests that started at ``since_iso`` or later."""
    return _rows(
        conn,
        "SELECT timestamp, request_id, model_name, success, cancelled, done_reason, response_time_ms, "
        "ttft_ms, queue_time_ms, tokens_per_second FROM inference_metrics WHERE timestamp >= ? ORDER BY id",
        [since_iso],
    )


# -- writes (write jobs: they run in the writer task) ----------------------------------------------


async def _save(
    fields: dict[str, Any],
    alert_id: int | None,
    transitions: list[tuple[str, str]],
    at_iso: str,
    db: aiosqlite.Connection,
) -> int:
    sql = portable(db)
    values = {**fields, "labels": json.dumps(fields["labels"], sort_keys=True)}
    if alert_id is None:
        cols = ", ".join(values)
        marks = ", ".join("?" * len(values))
        rows = await sql.run(
            f"INSERT INTO alerts ({cols}) VALUES ({marks}) RETURNING id", list(values.values())
        )
        alert_id = int(rows[0][0])
    else:
        sets = ", ".join(f"{k} = ?" for k in values)
        await sql.run(f"UPDATE alerts SET {sets} WHERE id = ?", [*values.values(), alert_id])
    await sql.run_many(
        "INSERT INTO alert_transitions (alert_id, at, from_state, to_state, value) VALUES (?, ?, ?, ?, ?)",
        [(alert_id, at_iso, f, t, fields["value"]) for f, t in transitions],
    )
    return alert_id


async def save_alert(
    writer: WriteExecutor,
    fields: dict[str, Any],
    alert_id: int | None,
    transitions: Sequence[tuple[str, str]],
    at_iso: str,
) -> int:
    """Insert (``alert_id`` None) or update an alert and append its transitions, in one transaction
    run by the writer; returns the alert's id. ``fields`` has exactly the keys of ``ALERT_FIELDS``."""
    missing = set(ALERT_FIELDS) ^ set(fields)
    if missing:
        raise ValueError(f"alert fields must be exactly {ALERT_FIELDS}; differing: {sorted(missing)}")
    return await writer.execute_write(partial(_save, dict(fields), alert_id, list(transitions), at_iso))


async def _delivery(alert_id: int, error: str | None, at_iso: str, db: aiosqlite.Connection) -> None:
    sql = portable(db)
    if error is None:
        await sql.run("UPDATE alerts SET last_delivered_at = ? WHERE id = ?", (at_iso, alert_id))
    else:
        await sql.run(
            "UPDATE alerts SET last_error = ?, delivery_failures = delivery_failures + 1 WHERE id = ?",
            (error[:2000], alert_id),
        )


async def record_delivery(writer: WriteExecutor, alert_id: int, error: str | None, at_iso: str) -> None:
    """A delivery attempt's outcome (``error`` None for a success), written by the writer."""
    await writer.execute_write(partial(_delivery, alert_id, error, at_iso))
