"""What can go wrong when persisting records, as a small hierarchy the writer can act on.

::

    StorageError                 anything raised by a store
     +-- StoreOpenError          the database cannot be opened or created (bad path, not a database)
     +-- StoreUnavailableError   a write failed for a reason that may pass (locked, disk full, I/O): retry
     +-- RecordRejectedError     the store refuses these records for what they are: retrying cannot help
     +-- StoreReadError          a read cannot be answered (no such file or table, not a database, locked)

The writer retries a batch that raised ``StoreUnavailableError`` (or anything unexpected) with back-off,
and replaces the records named by a ``RecordRejectedError`` so one bad record cannot block the queue.
"""

from __future__ import annotations

__all__ = [
    "RecordRejectedError",
    "StorageError",
    "StoreOpenError",
    "StoreReadError",
    "StoreUnavailableError",
]


class StorageError(Exception):
    """Base of every error a store raises."""


class StoreOpenError(StorageError):
    """The database at ``path`` cannot be opened or prepared; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot open the database at {path!r}: {reason} "
            "(check that the directory is writable and that the file is an ollamon SQLite database)"
        )
        self.path = path
        self.reason = reason


class StoreUnavailableError(StorageError):
    """A write failed for a reason that may go away (lock held elsewhere, disk full, I/O error)."""


class RecordRejectedError(StorageError):
    """Some records of a batch cannot be stored as they are (a value that cannot be serialised or bound).

    ``indices`` are the positions in the batch of the offending records, or ``None`` when the store could
    not tell which ones; then the writer retries the records one at a time to find them.
    """

    def __init__(self, message: str, indices: tuple[int, ...] | None = None) -> None:
        super().__init__(message)
        self.indices = indices


class StoreReadError(StorageError):
    """A read failed: the file or a table is missing, it is not a database, or it stayed locked."""
