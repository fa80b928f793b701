"""Closing the alert store while a cancelled save still runs in its thread must wait for it, not close
the connection under it (closing a sqlite3 connection under a running statement crashed the process once)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

from alerts.store import AlertStore
from storage.sqlite import SQLiteStore


async def test_close_waits_for_an_operation_in_flight(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    await store.open()  # migrations, including the alerts table
    await store.close()
    alerts = AlertStore(db)
    await alerts.open()

    def two_steps(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE probe (x INTEGER)")
        time.sleep(0.3)  # close() arrives here
        conn.execute("INSERT INTO probe VALUES (1)")

    task = asyncio.ensure_future(alerts._run(two_steps))
    await asyncio.sleep(0.05)  # the operation is running in a worker thread now
    task.cancel()  # as at shutdown: the awaiting task goes, the thread goes on
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await alerts.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT x FROM probe").fetchall() == [(1,)]  # the operation finished before the close
