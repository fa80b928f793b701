"""Storage owns the database: no module outside storage/ connects to it or holds SQL, and every write
(alert transitions included) is run by the one writer task, in order with the record batches."""

from __future__ import annotations

import ast
import asyncio
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from alerts.engine import AlertEngine
from alerts.errors import AlertStoreError
from alerts.rules import parse_alerts
from alerts.state import Alert
from alerts.store import AlertStore
from storage.base import WriteFn
from storage.errors import StoreUnavailableError
from storage.records import InferenceRecord, Record, iso_utc
from storage.sqlite import SQLiteStore
from storage.writer import Writer

ROOT = Path(__file__).resolve().parents[1]
# SQL as it is written in a string: a statement's first words, not the English words of a comment.
SQL = re.compile(
    r"\b(SELECT\s+[\w*(),. ]+\s+FROM|INSERT\s+(OR\s+\w+\s+)?INTO|DELETE\s+FROM|UPDATE\s+\w+\s+SET"
    r"|CREATE\s+(TABLE|INDEX)|BEGIN\s+IMMEDIATE|PRAGMA\s+\w+|VACUUM\b)"
)
DB_MODULES = ("sqlite3", "aiosqlite")


def offences(source: str, name: str) -> list[str]:
    """Imports of a database driver, ``.connect(`` on one, and string constants holding SQL."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names if a.name in DB_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DB_MODULES:
            found.append(f"{name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in DB_MODULES:
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            found.append(f"{name}:{node.lineno}: SQL {node.value[:60]!r}")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    """The scan itself can fail: each kind of offence is caught, prose is not."""
    bad = (
        "import sqlite3\nfrom aiosqlite import connect\nx = sqlite3.connect('f')\n"
        "q = f'SELECT a, b FROM t WHERE x = {1}'\nd = 'DELETE FROM t'\nu = 'UPDATE alerts SET x = 1'\n"
    )
    assert len(offences(bad, "bad.py")) == 6
    prose = '"""Select the rows from the list; delete is idempotent; update the set."""\n# DELETE is safe\n'
    assert offences(prose, "ok.py") == []


@pytest.mark.parametrize("package", ["proxy", "alerts"])
def test_no_module_outside_storage_opens_the_database_or_holds_sql(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert len(files) > 5
    found = [o for f in files for o in offences(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


class WatchedStore(SQLiteStore):
    """A real store that notes which task ran each write (a batch or a job)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.log: list[tuple[str, str]] = []

    def _task(self) -> str:
        task = asyncio.current_task()
        return task.get_name() if task is not None else "?"

    async def write_batch(self, records: Sequence[Record]) -> None:
        self.log.append(("batch", self._task()))
        await super().write_batch(records)

    async def execute_write(self, fn: WriteFn[Any], *, transaction: bool = True) -> Any:
        self.log.append(("job", self._task()))
        return await super().execute_write(fn, transaction=transaction)


def rec(i: int) -> InferenceRecord:
    return InferenceRecord(
        timestamp=iso_utc(1_800_000_000 + i), request_id=f"r{i}", model_name="m", response_time_ms=10.0
    )


async def test_alert_transitions_are_written_by_the_writer_task_in_queue_order(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path / "a.db")
    await store.open()
    # A long flush interval: the records below sit in a batch being collected when the save arrives.
    writer = Writer(store, flush_interval_s=30.0)
    await writer.start()
    spec = parse_alerts(
        [{"name": "hot", "when": {"metric": "gpu_temperature_c", "window": "10s", "threshold": 80}}],
        {"log": {"type": "log"}},
        "test",
        env={},
    )
    alerts = AlertStore(writer, store.reads)
    await alerts.open()
    engine = AlertEngine(spec, interval_s=60.0, store=alerts)
    await engine.start()
    try:
        for i in range(3):
            assert writer.submit(rec(i))
        engine.observe_system({"gpu_temperature_c": 90.0})
        await engine.evaluate()  # fires: the transition is saved through the writer and awaited
        assert engine.store_errors == 0
        (alert,) = engine.alerts.values()
        assert alert.state == "firing" and alert.id is not None
        # The save ended the batch being collected: its records committed first, then the alert.
        conn = sqlite3.connect(store.path)
        assert conn.execute("SELECT COUNT(*) FROM inference_metrics").fetchone()[0] == 3
        row = conn.execute("SELECT rule, state FROM alerts WHERE id = ?", (alert.id,)).fetchone()
        moves = conn.execute("SELECT from_state, to_state FROM alert_transitions").fetchall()
        conn.close()
        assert row == ("hot", "firing") and moves == [("inactive", "firing")]
    finally:
        await engine.stop()
        await writer.stop()
        await store.close()
    writes = [kind for kind, _ in store.log]
    assert writes[:2] == ["batch", "job"], store.log  # in queue order: the records, then the transition
    assert {task for _, task in store.log} == {"storage-writer"}, store.log
    assert writer.stats()["jobs"] >= 1 and writer.stats()["lost"] == 0


async def test_a_write_job_is_one_transaction_and_its_error_reaches_the_caller(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "j.db")
    await store.open()
    writer = Writer(store, flush_interval_s=0.01)
    await writer.start()

    async def half_then_fail(db: aiosqlite.Connection) -> None:
        await db.execute(
            "INSERT INTO retention_runs (started_at, finished_at, dry_run, deleted) VALUES ('a', 'b', 0, '{}')"
        )
        raise sqlite3.IntegrityError("refused on purpose")

    async def count(db: aiosqlite.Connection) -> int:
        async with db.execute("SELECT COUNT(*) FROM retention_runs") as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    try:
        with pytest.raises(Exception, match="refused on purpose"):
            await writer.execute_write(half_then_fail)
        assert await writer.execute_write(count) == 0  # rolled back as a whole
        assert writer.submit(rec(1))  # and the writer goes on
        assert await writer.execute_write(count) == 0
    finally:
        await writer.stop()
        await store.close()
    assert writer.stats()["written"] == 1 and writer.stats()["job_errors"] == 1


async def test_after_stop_writes_are_refused_not_run_elsewhere(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    writer = Writer(store)
    await writer.start()
    alerts = AlertStore(writer, store.reads)
    await writer.stop()
    alert = Alert(rule="r", fingerprint="{}", labels={}, severity="warning", state="firing")
    with pytest.raises(AlertStoreError, match="writer is stopping"):
        await alerts.save(alert, [("inactive", "firing")], 1_800_000_000.0)
    with pytest.raises(StoreUnavailableError):
        await writer.execute_write(lambda db: db.execute("SELECT 1"))
    assert alert.id is None
    assert await alerts.list_alerts() == []  # reads still work: they go through storage's reads
    await store.close()
