"""Turning queued items into records on the writer's worker thread, and ollamon's own error records.

A ``RecordSource.build()`` that raises must not cost the rest of its batch: it becomes an internal
``ErrorRecord`` carrying the traceback, as does a record the store refuses (see ``storage.writer``).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from typing import Any

from storage.records import ErrorRecord, InferenceRecord, Record, RecordSource, iso_utc

__all__ = ["build_all", "internal_error"]

logger = logging.getLogger(__name__)


def internal_error(message: str, *, request_id: str | None, stack: str | None, **extra: Any) -> ErrorRecord:
    return ErrorRecord(
        timestamp=iso_utc(time.time()),
        request_id=request_id,
        error_type="internal",
        error_message=message[:4000],
        stack_trace=stack,
        severity="error",
        **extra,
    )


# Classes already seen to satisfy ``Record``: checking a runtime Protocol walks the class every time (~10 µs
# a record), and a class that has ``build`` keeps it. Only grows by the few record classes there are.
_RECORD_TYPES: set[type] = {InferenceRecord, ErrorRecord}


def _is_record(value: object) -> bool:
    if type(value) in _RECORD_TYPES:
        return True
    if isinstance(value, Record):
        _RECORD_TYPES.add(type(value))
        return True
    return False


def build_all(items: Sequence[RecordSource]) -> tuple[list[Record], int]:
    """Build every item (on a worker thread); a failing build becomes an internal ErrorRecord."""
    records: list[Record] = []
    failures = 0
    for item in items:
        try:
            record = item.build()
            if not _is_record(record):  # registered types (SQLiteStore.register) too
                raise TypeError(
                    f"{type(item).__name__}.build() returned {type(record).__name__}, not a record"
                )
        except Exception as exc:
            failures += 1
            rid = getattr(item, "request_id", None)
            logger.exception(
                "building a record from %s failed; storing an internal error instead", type(item).__name__
            )
            records.append(
                internal_error(
                    f"building the record failed: {type(exc).__name__}: {exc}",
                    request_id=rid if isinstance(rid, str) else None,
                    stack=traceback.format_exc(),
                )
            )
        else:
            records.append(record)
    return records, failures
