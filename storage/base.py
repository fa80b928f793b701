"""The contracts between the writer and what it writes to: a ``Store`` (the source of truth) and a
``HotView`` (a disposable, best-effort copy such as Redis).

SQLite implements ``Store`` today; a PostgreSQL store must fit the same four methods, so nothing here
mentions SQL dialects, threads or files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from storage.records import Record

__all__ = ["Health", "HotView", "Store"]

Health = Literal["ok", "down"]


class Store(Protocol):
    """A durable place for records, owned by exactly one writer task."""

    async def open(self) -> None:
        """Create or migrate the schema and get ready to write; raise ``StoreOpenError`` if impossible."""

    async def write_batch(self, records: Sequence[Record]) -> None:
        """Persist ``records`` in ONE transaction: all of them or none.

        An ``InferenceRecord`` becomes an ``inference_metrics`` row, plus an ``error_metrics`` row for its
        ``.error`` and a ``request_text`` row when the store keeps text; an ``ErrorRecord`` becomes an
        ``error_metrics`` row. Raise ``StoreUnavailableError`` when a retry may succeed and
        ``RecordRejectedError`` (with the offending indices when known) when it cannot.
        """

    async def health(self) -> Health:
        """``"ok"`` when the store answers a trivial query now, else ``"down"``; never raises."""

    async def close(self) -> None:
        """Release connections; safe to call twice."""


class HotView(Protocol):
    """Receives every batch after it is safely stored; must return at once and never raise."""

    def offer(self, records: Sequence[Record]) -> None:
        """Queue ``records`` for the view without awaiting anything."""
