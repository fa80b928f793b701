"""The alert engine's view of its history: ``Alert`` objects in, ``Alert`` objects out, over storage.

A thin adapter. The tables and their SQL belong to storage (storage/alerts.py); writes go through the
writer's queue (``Writer.execute_write``), so an alert transition is a short transaction of its own run by
the one task that writes the database, and reads go through ``storage.reads.Reads`` on a worker thread.
This module only turns an ``Alert`` into column values and back (Unix seconds <-> ISO-8601 UTC).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from alerts.errors import AlertStoreError
from alerts.state import Alert, Transition
from storage import alerts as alert_tables
from storage.base import WriteExecutor
from storage.errors import StorageError
from storage.reads import Reads
from storage.records import InferenceRecord, iso_utc

__all__ = ["AlertStore"]

T = TypeVar("T")


def _iso(t: float | None) -> str | None:
    return None if t is None else iso_utc(t)


def _epoch(s: str | None) -> float | None:
    return None if s is None else _dt.datetime.fromisoformat(s).timestamp()


def _fields(a: Alert, at: float) -> dict[str, Any]:
    return {
        "rule": a.rule,
        "fingerprint": a.fingerprint,
        "labels": a.labels,
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


class AlertStore:
    """Alerts in the proxy's database: written by ``writer``, read through ``reads``."""

    def __init__(self, writer: WriteExecutor, reads: Reads) -> None:
        self.writer = writer
        self.reads = reads

    async def _read(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except StorageError as exc:
            raise AlertStoreError(f"cannot read alerts: {exc}") from exc

    async def open(self) -> None:
        """Fail now (``AlertStoreError``) when the database has no alerts table (migration m004)."""
        await self._read(lambda: self.reads.alerts("all", 1))

    async def close(self) -> None:
        """Nothing to release: the store and the writer belong to storage."""

    # -- writes ----------------------------------------------------------------------------------

    async def save(self, alert: Alert, transitions: Sequence[Transition], at: float) -> None:
        """Insert or update ``alert`` (setting ``alert.id``) and append its ``transitions``, atomically."""
        try:
            alert.id = await alert_tables.save_alert(
                self.writer, _fields(alert, at), alert.id, list(transitions), iso_utc(at)
            )
        except StorageError as exc:
            raise AlertStoreError(f"cannot record alert {alert.rule}: {exc}") from exc

    async def record_delivery(self, alert_id: int, error: str | None, at: float) -> None:
        """A delivery attempt's outcome: ``error`` None for a success."""
        try:
            await alert_tables.record_delivery(self.writer, alert_id, error, iso_utc(at))
        except StorageError as exc:
            raise AlertStoreError(f"cannot record the delivery of alert {alert_id}: {exc}") from exc

    # -- reads -----------------------------------------------------------------------------------

    async def load_open(self) -> list[Alert]:
        """Pending and firing alerts, to carry on with after a restart (not announced again)."""
        return [_alert(r) for r in await self._read(self.reads.open_alerts)]

    async def last_announced(self) -> dict[tuple[str, str], float]:
        """When each (rule, label set) was last announced firing: cooldowns carry over a restart."""
        rows = await self._read(self.reads.last_announced)
        return {key: float(_epoch(at) or 0.0) for key, at in rows.items()}

    async def recent_requests(self, since: float) -> list[tuple[float, InferenceRecord]]:
        """Requests stored since ``since`` with their finish time: refills the windows after a restart."""
        # a request that started up to an hour earlier may have finished since
        rows = await self.requests_started_since(since - 3600)
        return [(finished, rec) for finished, rec in rows if finished >= since]

    async def requests_started_since(self, since: float) -> list[tuple[float, InferenceRecord]]:
        """Requests that started at ``since`` or later, with their finish time, by finish time (the alert
        lease holder reads the other instances' requests with this: alerts/fleet.py)."""
        rows = await self._read(lambda: self.reads.requests_since(iso_utc(since)))
        out = []
        for r in rows:
            started = _epoch(r["timestamp"]) or 0.0
            finished = started + (r["response_time_ms"] or 0.0) / 1000.0
            rec = InferenceRecord(
                timestamp=r["timestamp"],
                request_id=r.get("request_id") or "",  # de-duplicates the fleet's rows (alerts/fleet.py)
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
        """Alerts in ``state`` (firing, pending, resolved, open, all), newest first."""
        if state not in alert_tables.LIST_STATES:
            raise ValueError(f"state must be one of {', '.join(alert_tables.LIST_STATES)}")
        return await self._read(lambda: self.reads.alerts(state, limit))

    async def get_alert(self, alert_id: int) -> dict[str, Any] | None:
        """One alert with its transitions, oldest first."""
        return await self._read(lambda: self.reads.alert(alert_id))
