"""The ``alerts`` and ``alert_transitions`` tables (migration m004_alerts): what fired, when, and who was told.

Why a connection of its own instead of the writer: alert writes are rare (a transition, a delivery
result) and must not wait behind request batches, nor make the request writer know about alerts. WAL
lets this connection write between the writer's batches; ``busy_timeout`` covers the overlap. Every
call runs on a worker thread, so the event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alerts.errors import AlertStoreError
from alerts.state import OPEN_STATES, Alert, Transition
from storage.records import InferenceRecord, iso_utc

__all__ = ["AlertStore", "read_alerts"]

logger = logging.getLogger(__name__)

_LIST_STATES = {
    "firing": ("firing",),
    "pending": ("pending",),
    "resolved": ("resolved",),
    "open": OPEN_STATES,
    "all": ("pending", "firing", "resolved", "inactive"),
}


def _iso(t: float | None) -> str | None:
    return None if t is None else iso_utc(t)


def _epoch(s: str | None) -> float | None:
    return None if s is None else _dt.datetime.fromisoformat(s).timestamp()


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["labels"] = json.loads(row["labels"])
    return row


def _query(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _list(conn: sqlite3.Connection, state: str, limit: int) -> list[dict[str, Any]]:
    states = _LIST_STATES[state]
    marks = ",".join("?" * len(states))
    rows = _query(
        conn,
        f"SELECT * FROM alerts WHERE state IN ({marks}) ORDER BY id DESC LIMIT ?",
        [*states, int(limit)],
    )
    return [_decode(r) for r in rows]


def read_alerts(path: str | Path, state: str = "all", limit: int = 100) -> list[dict[str, Any]]:
    """Alerts from the database file at ``path`` (read-only; for the CLI), newest first."""
    if state not in _LIST_STATES:
        raise ValueError(f"state must be one of {', '.join(_LIST_STATES)}, not {state!r}")
    if not Path(path).exists():
        raise AlertStoreError(f"{path}: no such database")
    try:
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise AlertStoreError(f"{path}: cannot open: {exc}") from exc
    try:
        return _list(conn, state, limit)
    except sqlite3.OperationalError as exc:
        raise AlertStoreError(
            f"{path}: cannot read alerts ({exc}); is it an ollamon database opened by a version with alerts?"
        ) from exc
    finally:
        conn.close()


class AlertStore:
    """Reads and writes alerts in the SQLite file the proxy records to (already migrated by the store)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_ms / 1000, check_same_thread=False, isolation_level=None
            )
            conn.execute("SELECT 1 FROM alerts LIMIT 1").fetchall()  # fail now if m004 is missing
            return conn

        try:
            self._conn = await asyncio.to_thread(connect)
        except sqlite3.Error as exc:
            raise AlertStoreError(f"{self.path}: cannot open the alerts table: {exc}") from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return

        def closing() -> None:
            # Under the lock: a save whose awaiting task was cancelled may still be running in its thread,
            # and closing a sqlite3 connection under a running statement crashes the process.
            with self._lock:
                conn.close()

        await asyncio.to_thread(closing)

    async def _run(self, fn: Any, *args: Any) -> Any:
        conn = self._conn
        if conn is None:
            raise AlertStoreError(f"{self.path}: the alert store is not open")

        def locked() -> Any:
            with self._lock:
                return fn(conn, *args)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise AlertStoreError(f"{self.path}: {type(exc).__name__}: {exc}") from exc

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, alert: Alert, transitions: Sequence[Transition], at: float) -> None:
        """Insert or update ``alert`` (setting ``alert.id``) and append its ``transitions``, atomically."""
        alert.id = await self._run(_save, alert, list(transitions), at)

    async def record_delivery(self, alert_id: int, error: str | None, at: float) -> None:
        """A delivery attempt's outcome: ``error`` None for a success."""
        await self._run(_record_delivery, alert_id, error, at)

    # -- reads -----------------------------------------------------------------------------------

    async def load_open(self) -> list[Alert]:
        """Pending and firing alerts, to carry on with after a restart (not announced again)."""
        rows: list[dict[str, Any]] = await self._run(
            _query, "SELECT * FROM alerts WHERE state IN ('pending', 'firing') ORDER BY id", []
        )
        return [_alert(_decode(r)) for r in rows]

    async def last_announced(self) -> dict[tuple[str, str], float]:
        """When each (rule, label set) was last announced firing: cooldowns carry over a restart."""
        rows: list[dict[str, Any]] = await self._run(
            _query,
            "SELECT rule, fingerprint, max(announced_at) AS at FROM alerts "
            "WHERE announced_at IS NOT NULL GROUP BY rule, fingerprint",
            [],
        )
        return {(r["rule"], r["fingerprint"]): float(_epoch(r["at"]) or 0.0) for r in rows}

    async def recent_requests(self, since: float) -> list[tuple[float, InferenceRecord]]:
        """Requests stored since ``since`` with their finish time: refills the windows after a restart."""
        rows: list[dict[str, Any]] = await self._run(
            _query,
            "SELECT timestamp, model_name, success, cancelled, done_reason, response_time_ms, ttft_ms, "
            "queue_time_ms, tokens_per_second FROM inference_metrics WHERE timestamp >= ? ORDER BY id",
            [iso_utc(since - 3600)],  # a request that started up to an hour earlier may have finished since
        )
        out = []
        for r in rows:
            started = _epoch(r["timestamp"]) or 0.0
            finished = started + (r["response_time_ms"] or 0.0) / 1000.0
            if finished < since:
                continue
            rec = InferenceRecord(
                timestamp=r["timestamp"],
                request_id="",
                model_name=r["model_name"],
                success=bool(r["success"]),
                cancelled=bool(r["cancelled"]),
                done_reason=r["done_reason"],
                response_time_ms=r["response_time_ms"],
                ttft_ms=r["ttft_ms"],
                queue_time_ms=r["queue_time_ms"],
                tokens_per_second=r["tokens_per_second"],
            )
            out.append((finished, rec))
        out.sort(key=lambda p: p[0])
        return out

    async def list_alerts(self, state: str = "all", limit: int = 100) -> list[dict[str, Any]]:
        if state not in _LIST_STATES:
            raise ValueError(f"state must be one of {', '.join(_LIST_STATES)}")
        rows: list[dict[str, Any]] = await self._run(_list, state, limit)
        return rows

    async def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        """One alert with its transitions, oldest first."""

        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            rows = _query(conn, "SELECT * FROM alerts WHERE id = ?", [alert_id])
            if not rows:
                return None
            row = _decode(rows[0])
            row["transitions"] = _query(
                conn,
                "SELECT at, from_state, to_state, value FROM alert_transitions WHERE alert_id = ? ORDER BY id",
                [alert_id],
            )
            return row

        result: dict[str, Any] | None = await self._run(read)
        return result


def _save(conn: sqlite3.Connection, a: Alert, transitions: list[Transition], at: float) -> int:
    fields = {
        "rule": a.rule,
        "fingerprint": a.fingerprint,
        "labels": json.dumps(a.labels, sort_keys=True),
        "severity": a.severity,
        "state": a.state,
        "value": a.value,
        "threshold": a.threshold,
        "message": a.message,
        "started_at": _iso(a.started_at if a.started_at is not None else at),
        "fired_at": _iso(a.fired_at),
        "resolved_at": _iso(a.resolved_at),
        "last_notified_at": _iso(a.last_notified_at),
        "announced_at": _iso(a.announced_at),
        "notification_count": a.notification_count,
    }
    conn.execute("BEGIN IMMEDIATE")
    try:
        if a.id is None:
            cols = ", ".join(fields)
            cur = conn.execute(
                f"INSERT INTO alerts ({cols}) VALUES ({', '.join('?' * len(fields))})", list(fields.values())
            )
            alert_id = int(cur.lastrowid or 0)
        else:
            alert_id = a.id
            sets = ", ".join(f"{k} = ?" for k in fields)
            conn.execute(f"UPDATE alerts SET {sets} WHERE id = ?", [*fields.values(), alert_id])
        conn.executemany(
            "INSERT INTO alert_transitions (alert_id, at, from_state, to_state, value) VALUES (?, ?, ?, ?, ?)",
            [(alert_id, iso_utc(at), f, t, a.value) for f, t in transitions],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return alert_id


def _record_delivery(conn: sqlite3.Connection, alert_id: int, error: str | None, at: float) -> None:
    if error is None:
        conn.execute("UPDATE alerts SET last_delivered_at = ? WHERE id = ?", (iso_utc(at), alert_id))
    else:
        conn.execute(
            "UPDATE alerts SET last_error = ?, delivery_failures = delivery_failures + 1 WHERE id = ?",
            (error[:2000], alert_id),
        )


def _alert(row: dict[str, Any]) -> Alert:
    return Alert(
        rule=row["rule"],
        fingerprint=row["fingerprint"],
        labels=row["labels"],
        severity=row["severity"],
        threshold=row["threshold"],
        state=row["state"],
        id=int(row["id"]),
        value=row["value"],
        message=row["message"],
        started_at=_epoch(row["started_at"]),
        fired_at=_epoch(row["fired_at"]),
        last_notified_at=_epoch(row["last_notified_at"]),
        announced_at=_epoch(row["announced_at"]),
        notification_count=int(row["notification_count"]),
        last_error=row["last_error"],
        restored=True,
    )
