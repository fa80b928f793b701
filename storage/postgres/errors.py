"""What a PostgreSQL failure means for the writer: retry later, or never for these records.

The hierarchy is storage/errors.py's; this module only sorts asyncpg's exceptions into it, by SQLSTATE class
(PostgreSQL's own taxonomy, stable across versions):

* ``StoreUnavailableError`` (the writer retries with back-off): no connection or a lost one (class 08, OS
  errors, timeouts, a closed connection), the server shutting down or cancelling (57), out of resources
  (53: disk full, too many connections), I/O (58), serialisation or deadlock (40), a lock not available
  (55), an internal error (XX), and a missing table or column (42: the schema is behind, as SQLite's "no such
  table" counts);
* ``RecordRejectedError`` (the writer sets the records aside): data (22) and constraint (23) errors, limits
  (54: a row too big), a value asyncpg cannot encode, and anything else raised by a batch's hooks.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]  # no stubs or py.typed in asyncpg 0.32

from storage.errors import RecordRejectedError, StorageError, StoreOpenError, StoreUnavailableError

__all__ = ["PgOpenError", "classify", "redact", "retryable"]

_RETRY_CLASSES = frozenset({"08", "40", "42", "53", "55", "57", "58", "XX"})


class PgOpenError(StoreOpenError):
    """``StoreOpenError`` with a hint that fits a server, not a file."""

    def __init__(self, where: str, reason: str) -> None:
        StorageError.__init__(
            self,
            f"cannot open the PostgreSQL database at {where!r}: {reason} (check that the server answers, "
            "that the database exists and that the role may create tables in it)",
        )
        self.path = where
        self.reason = reason


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def retryable(exc: BaseException) -> bool:
    """True when ``exc`` may go away by itself (the connection, the server, resources, locks)."""
    if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return not isinstance(exc, ValueError)  # closed connection: retry; a bad argument: never
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _RETRY_CLASSES
    return isinstance(exc, asyncpg.exceptions.InternalClientError)


def classify(where: str, exc: Exception) -> StorageError:
    """The ``StorageError`` the writer acts on for ``exc`` raised while writing to ``where``."""
    if isinstance(exc, StoreUnavailableError | RecordRejectedError):
        return exc
    state = getattr(exc, "sqlstate", None)
    what = f"{where}: {type(exc).__name__}{f' [{state}]' if state else ''}: {exc}"
    if retryable(exc):
        return StoreUnavailableError(what)
    return RecordRejectedError(what)
