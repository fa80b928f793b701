"""The contracts between the writer and what it writes to: a ``Store`` (the source of truth) and a
``HotView`` (a disposable, best-effort copy such as Redis), plus the two roles around the writer: a
``WriteExecutor`` (what runs write jobs: the writer) and ``Maintenance`` (a background job the writer runs,
such as retention).

SQLite implements ``Store`` today; a PostgreSQL store must fit the same methods, so nothing here mentions
SQL dialects, threads or files. docs/storage.md ("The storage interface") lists the whole interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

from storage.records import Record

__all__ = ["Health", "HotView", "Maintenance", "Store", "WriteExecutor", "WriteFn"]

Health = Literal["ok", "down"]
T = TypeVar("T")

# A write job: runs on the store's write connection (its type is the store's business), in the writer task.
WriteFn = Callable[[Any], Awaitable[T]]


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

    async def execute_write(self, fn: WriteFn[T], *, transaction: bool = True) -> T:
        """Run the write job ``fn(connection)``; with ``transaction`` inside one transaction of its own.

        Called only by the writer task, between batches. Errors are sorted as for ``write_batch``."""

    async def health(self) -> Health:
        """``"ok"`` when the store answers a trivial query now, else ``"down"``; never raises."""

    async def close(self) -> None:
        """Release connections; safe to call twice."""


class HotView(Protocol):
    """Receives every batch after it is safely stored; must return at once and never raise."""

    def offer(self, records: Sequence[Record]) -> None:
        """Queue ``records`` for the view without awaiting anything."""


class WriteExecutor(Protocol):
    """Runs write jobs in order with everything else written (the writer)."""

    async def execute_write(self, fn: WriteFn[T], *, transaction: bool = True) -> T:
        """Queue ``fn`` behind what is already queued and return its result once it ran."""


class Maintenance(Protocol):
    """A background job of the store (retention) that the writer starts and stops with itself."""

    last_run: dict[str, Any] | None

    async def loop(self, executor: WriteExecutor) -> None:
        """Run forever (until cancelled), writing only through ``executor``."""
