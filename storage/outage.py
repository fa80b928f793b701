"""Whether the writer's writes are failing now, since when and why: what health and readiness report.

A write that waits out SQLite's busy timeout and then fails began failing when it started, not when it
gave up, so an outage is dated from the start of its first failed attempt. The cause is the innermost
error (``database is locked``, ``database or disk is full``), short enough for a health line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from storage.records import iso_utc

__all__ = ["WriteOutage", "short_cause"]

logger = logging.getLogger(__name__)


def short_cause(exc: BaseException) -> str:
    """The root cause's message: ``database is locked`` rather than the wrapper's path and class."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return str(root) or type(root).__name__


@dataclass(slots=True)
class _Spell:
    started_wall: float
    started_mono: float
    failures: int
    cause: str


class WriteOutage:
    """One spell of failing writes at a time: ``failed()`` per failed attempt, ``succeeded()`` per success."""

    def __init__(self) -> None:
        self._spell: _Spell | None = None
        self.failed_writes = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # wall clock of the latest failure
        self.last_outage: dict[str, Any] | None = None

    @property
    def failing(self) -> bool:
        return self._spell is not None

    @property
    def cause(self) -> str | None:
        """The short cause while writes fail, else None."""
        return self._spell.cause if self._spell is not None else None

    def failed(self, exc: BaseException, *, started_wall: float, started_mono: float, rows: int) -> None:
        """Count a failed attempt that began at ``started_*``; the first of a spell logs a warning."""
        self.failed_writes += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.last_error_at = time.time()
        cause = short_cause(exc)
        if self._spell is None:
            self._spell = _Spell(started_wall, started_mono, 1, cause)
            logger.warning("store write failed; retrying the batch of %d with back-off: %s", rows, exc)
        else:
            self._spell.failures += 1
            self._spell.cause = cause

    def succeeded(self) -> None:
        """End the spell, if any: log its length (from the first failed attempt's start) and clear the error."""
        spell = self._spell
        if spell is None:
            return
        duration_s = time.monotonic() - spell.started_mono
        logger.warning(
            "store recovered after %d failed writes in %.1f s (%s); nothing lost",
            spell.failures,
            duration_s,
            spell.cause,
        )
        self.last_outage = {
            "started_at": iso_utc(spell.started_wall),
            "duration_s": round(duration_s, 3),
            "failed_writes": spell.failures,
            "cause": spell.cause,
        }
        self._spell = None
        self.last_error = None
        self.last_error_at = None

    def stats(self) -> dict[str, Any]:
        spell = self._spell
        return {
            "write_failing": spell is not None,
            "failing_since": iso_utc(spell.started_wall) if spell is not None else None,
            "last_error": (
                {"message": self.last_error, "at": iso_utc(self.last_error_at)}
                if self.last_error is not None and self.last_error_at is not None
                else None
            ),
            "last_outage": self.last_outage,
        }
