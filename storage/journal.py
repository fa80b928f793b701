"""The run journal: a small JSON file next to the database saying what was in memory, for the next start.

A ``kill -9`` (or an OOM kill, or a power cut) loses what the writer had not committed yet: the records
queued or in hand (at most about one flush interval of them) and the requests still in flight. Nothing in
the dead process can count them, so the writer rewrites this file every flush interval (on a worker
thread, only when a figure changed) with its pid, queue depth, the batch in hand and the in-flight count,
and marks it ``clean_shutdown`` once ``stop()`` has drained everything. On the next start a file without
that mark means the previous run died: its last figures are logged and shown in ``/ollamon/health``.

The figures are a snapshot up to one interval old, so they are an estimate of what was lost, not a
ledger; docs/storage.md explains the window.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

__all__ = ["RunJournal", "journal_path"]

logger = logging.getLogger(__name__)


def journal_path(db_path: str | Path, instance: str | None = None) -> Path:
    """``<db>.run.json``: next to the database (SQLite's own files are ``<db>-wal`` / ``<db>-shm``). With
    ``instance`` (a PostgreSQL database, shared: no file of its own), ``<db dir>/<instance>.run.json``, so
    every instance on a host keeps its own journal; the directory is created if missing."""
    p = Path(db_path)
    if instance is None:
        return p.with_name(p.name + ".run.json")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in instance)[:128] or "ollamon"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # RunJournal then warns that it cannot write, as for any unwritable place
    return p.with_name(f"{safe}.run.json")


def _alive(pid: Any) -> bool:
    """Whether another process with ``pid`` exists (pids are reused, so only a hint)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunJournal:
    """Reads the previous run's file once, then rewrites it atomically (temp file + rename, no fsync:
    the page cache survives the death of the process, which is what this is for)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._failing = False

    def read_previous(self) -> dict[str, Any] | None:
        """The previous run's last snapshot, or None when there is none or it cannot be read."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read the run journal %s: %s", self.path, exc)
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # A torn write cannot happen (rename is atomic), so this is someone else's file or a bad disk.
            logger.warning("the run journal %s is not JSON (%s); ignored", self.path, exc)
            return None
        return data if isinstance(data, dict) else None

    def write(self, snapshot: dict[str, Any]) -> bool:
        """Replace the file with ``snapshot``; False (logged once per failure spell) if it cannot."""
        try:
            self._tmp.write_bytes(orjson.dumps(snapshot))
            os.replace(self._tmp, self.path)
        except OSError as exc:
            if not self._failing:
                logger.warning("cannot write the run journal %s: %s", self.path, exc)
            self._failing = True
            return False
        self._failing = False
        return True

    # -- what the writer calls -------------------------------------------------------------------

    async def open(self, first: dict[str, Any]) -> dict[str, Any] | None:
        """Read the previous run's snapshot (warning when it did not end cleanly), then write ``first``."""
        previous = await asyncio.to_thread(self.read_previous)
        pid = previous.get("pid") if previous is not None else None
        if previous is not None and previous.get("clean_shutdown") is not True and _alive(pid):
            logger.warning(
                "the run journal %s was written by pid %s, which still runs: two ollamon processes may be "
                "using this database, and its crash figures would mean nothing",
                self.path,
                pid,
            )
        elif previous is not None and previous.get("clean_shutdown") is not True:
            logger.warning(
                "the previous run (pid %s, last journal %s) did not shut down cleanly: about %s finished "
                "records were queued or being written and %s requests were in flight; they were not recorded",
                previous.get("pid"),
                previous.get("updated_at"),
                previous.get("queued"),
                previous.get("in_flight"),
            )
        await asyncio.to_thread(self.write, first)
        return previous

    async def keep(
        self, snapshot: Callable[[], dict[str, Any]], stopping: asyncio.Event, interval_s: float
    ) -> None:
        """Until ``stopping`` is set, rewrite the file every ``interval_s`` when a figure changed (on a
        worker thread: never on the request path)."""
        last: tuple[Any, ...] = ()
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), interval_s)
            except TimeoutError:
                pass
            snap = snapshot()
            key = tuple(v for k, v in snap.items() if k != "updated_at")
            if key != last:
                await asyncio.to_thread(self.write, snap)
                last = key

    async def close(self, final: dict[str, Any]) -> None:
        """Write the last snapshot, marked ``clean_shutdown`` by the caller once everything is drained."""
        await asyncio.to_thread(self.write, final)
