"""Shutting down while an alert write is in flight: the write is the writer's job, so a cancelled caller
cannot leave it half done, and the writer finishes it before it stops and the store closes (closing a
connection under a running statement crashed the process once, when alerts had a connection of their own)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import aiosqlite

from alerts.state import Alert
from alerts.store import AlertStore
from storage.sqlite import SQLiteStore
from storage.writer import Writer


async def test_a_write_in_flight_completes_before_the_writer_stops_and_the_store_closes(
    tmp_path: Path,
) -> None:
    db = tmp_path / "a.db"
    store = SQLiteStore(db)
    await store.open()
    writer = Writer(store)
    await writer.start()
    alerts = AlertStore(writer, store.reads)
    await alerts.open()
    started = asyncio.Event()

    async def two_steps(conn: aiosqlite.Connection) -> None:
        await conn.execute("CREATE TABLE probe (x INTEGER)")
        started.set()
        await asyncio.sleep(0.3)  # the caller is cancelled and stop() arrives here
        await conn.execute("INSERT INTO probe VALUES (1)")

    task = asyncio.ensure_future(writer.execute_write(two_steps))
    # behind it, a transition whose caller goes away too (as at shutdown)
    alert = Alert(rule="r", fingerprint="{}", labels={}, severity="warning", state="firing")
    save = asyncio.ensure_future(alerts.save(alert, [("inactive", "firing")], 1_800_000_000.0))
    await started.wait()
    task.cancel()
    save.cancel()
    for t in (task, save):
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await alerts.close()
    await writer.stop()
    await store.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT x FROM probe").fetchall() == [(1,)]  # the job finished, as one transaction
    # the save's caller left before it ran: it was not run at all, rather than run half
    assert con.execute("SELECT COUNT(*) FROM alerts").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM alert_transitions").fetchone()[0] == 0
    con.close()
    assert writer.stats()["lost"] == 0
