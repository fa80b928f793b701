"""The single writer: a bounded queue in front of one store, drained in batches by one task.

Guarantees (docs/storage.md spells them out):

* ``submit()`` never blocks or awaits; when the queue is full the item is dropped and counted.
* Everything accepted is written, in batches of up to ``batch_rows`` rows, one transaction each, as long
  as the process lives: records are held in memory until their batch commits, so a ``kill -9`` (or an
  OOM kill) loses what is queued or in hand, up to about one flush interval of them. The run journal
  (``storage.journal``) lets the next start say how many.
* A failing store does not lose a batch: the same batch is retried with back-off (0.1 s doubling to
  5 s) while the queue keeps absorbing new items. Only ``stop()`` gives up on a store that is still
  down after ``stop_grace_retries`` more tries, and counts what it could not write in ``lost``.
  While writes fail, ``outage`` says since when (the start of the first failed attempt) and why.
* ``build()`` runs on a worker thread; one that raises becomes an internal ``ErrorRecord``. A record the
  store rejects for what it is (``RecordRejectedError``) is replaced the same way, so one bad record
  can never wedge the queue.
* Every other write (alert transitions, retention deletes, checkpoints, vacuum) is a write job:
  ``await execute_write(fn)`` queues it behind the records already queued; the writer task runs it between
  two batches, in a transaction of its own, and hands back its result or its error. So the task is the
  only one that ever writes, and a job never lands inside a batch's transaction (datasette's
  ``execute_write_fn``). A job is not retried: its caller decides.
* ``maintenance`` (retention) runs beside the writer from ``start()`` to ``stop()``, writing only through
  ``execute_write`` in short jobs, so a batch waits for at most one of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from storage.base import HotView, Maintenance, Store, WriteFn
from storage.build import build_all, internal_error
from storage.errors import RecordRejectedError, StoreUnavailableError
from storage.histogram import exact_quantile
from storage.journal import RunJournal
from storage.outage import WriteOutage
from storage.records import Record, RecordSource, iso_utc, stamp_instance
from storage.tasks import spawn

__all__ = ["Writer"]

logger = logging.getLogger(__name__)

_STOP: Final = object()  # queued by stop() to wake a writer waiting on an empty queue
_DURATIONS_KEPT = 1000
T = TypeVar("T")


@dataclass(slots=True)
class _Job:
    """A write job in the queue: run ``fn`` on the store, then resolve ``future``."""

    fn: WriteFn[Any]
    transaction: bool
    future: asyncio.Future[Any]


class Writer:
    """Owns ``store`` for writing: ``submit()`` from anywhere on the loop, ``start()``/``stop()`` once."""

    def __init__(
        self,
        store: Store,
        *,
        queue_size: int = 10000,
        batch_rows: int = 500,
        flush_interval_s: float = 0.25,
        hot: HotView | None = None,
        stop_grace_retries: int = 3,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        overflow_warn_interval_s: float = 10.0,
        journal: RunJournal | None = None,
        in_flight: Callable[[], int] | None = None,
        maintenance: Maintenance | None = None,
        instance: str | None = None,
    ) -> None:
        if queue_size < 1 or batch_rows < 1:
            raise ValueError("queue_size and batch_rows must be at least 1")
        self._store = store
        self._listeners: list[HotView] = [hot] if hot is not None else []
        self._queue: asyncio.Queue[RecordSource | _Job | object] = asyncio.Queue(maxsize=queue_size)
        self._queue_size = queue_size
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._stop_grace_retries = stop_grace_retries
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._overflow_warn_interval_s = overflow_warn_interval_s
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # submit() refuses once stop() began
        self._stopping = asyncio.Event()
        self._abandon = False  # stop() gave up on a dead store: count the rest as lost
        self._last_overflow_warn = -math.inf
        self._durations_ms: deque[float] = deque(maxlen=_DURATIONS_KEPT)
        self._journal = journal
        self._in_flight = in_flight
        self._journal_task: asyncio.Task[None] | None = None
        self.maintenance = maintenance
        # Stamped on every inference and error record written (``server.instance``; docs/storage.md).
        self.instance = instance
        self._maintenance_task: asyncio.Task[None] | None = None
        self._in_hand = 0  # items taken off the queue whose batch is not committed yet
        self._started_wall = time.time()
        self.outage = WriteOutage()
        self.previous_run: dict[str, Any] | None = None  # the run journal's last word on the previous run
        self.dropped = 0
        self.written = 0
        self.batches = 0
        self.lost = 0
        self.rejected = 0
        self.build_errors = 0
        self.last_batch_ms: float | None = None
        self.jobs = 0  # write jobs run (successfully or not)
        self.job_errors = 0
        self.last_job_ms: float | None = None

    @property
    def failed_writes(self) -> int:
        return self.outage.failed_writes

    @property
    def last_error(self) -> str | None:
        """The latest write error while writes fail; None once a write succeeded again."""
        return self.outage.last_error

    # -- the hot path ----------------------------------------------------------------------------

    def submit(self, item: RecordSource) -> bool:
        """Queue ``item`` without waiting; ``False`` (and counted in ``dropped``) when it cannot be queued."""
        if self._closed:
            self._count_drop("the writer is stopping")
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._count_drop(f"the queue is full ({self._queue_size} items)")
            return False
        return True

    def _count_drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_overflow_warn >= self._overflow_warn_interval_s:
            self._last_overflow_warn = now
            logger.warning("dropping records: %s; %d dropped so far", why, self.dropped)

    # -- write jobs ------------------------------------------------------------------------------

    async def execute_write(self, fn: WriteFn[T], *, transaction: bool = True) -> T:
        """Run ``fn(connection)`` in the writer task, after what is queued now; return its result.

        With ``transaction`` the store wraps it in one transaction (committed, or rolled back when it
        raises); without, ``fn`` runs alone between two transactions (VACUUM, checkpoints). Raises what
        the store raised (``StoreUnavailableError`` when the writer is stopped or gave up). Never call it
        on the request path: it waits for the queue."""
        if self._closed:
            raise StoreUnavailableError("the writer is stopping; the write was not run")
        job = _Job(fn, transaction, asyncio.get_running_loop().create_future())
        await self._queue.put(job)  # waits only while the queue is full
        if self._task is None or self._task.done():
            self._fail_job(job, "the writer is not running")
        return await job.future  # type: ignore[no-any-return]

    @staticmethod
    def _fail_job(job: _Job, why: str) -> None:
        if not job.future.done():
            job.future.set_exception(StoreUnavailableError(f"{why}; the write was not run"))

    async def _run_job(self, job: _Job) -> None:
        if job.future.done():  # its caller was cancelled before it ran: nothing waits for it
            return
        if self._abandon:
            self._fail_job(job, "the store is down and the writer stopped")
            return
        started = time.perf_counter()
        try:
            result = await self._store.execute_write(job.fn, transaction=job.transaction)
        except Exception as exc:
            self.job_errors += 1
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)
        finally:
            self.jobs += 1
            self.last_job_ms = (time.perf_counter() - started) * 1000

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the previous run's journal, then spawn the writer task and the journal task (once)."""
        if self._task is not None:
            return
        if self._journal is not None:
            self.previous_run = await self._journal.open(self._snapshot(clean=False))
            interval = min(max(self._flush_interval_s, 0.05), 1.0)
            self._journal_task = spawn(
                self._journal.keep(lambda: self._snapshot(clean=False), self._stopping, interval),
                name="storage-run-journal",
            )
        self._task = spawn(self._run(), name="storage-writer")
        if self.maintenance is not None:
            self._maintenance_task = spawn(self.maintenance.loop(self), name="storage-maintenance")

    async def stop(self) -> None:
        """Stop maintenance, refuse new items, write everything queued, and return when the task has exited."""
        task, self._maintenance_task = self._maintenance_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._closed = True
        self._stopping.set()
        if self._task is None:
            if not self._queue.empty():
                logger.error("writer stopped before it started: %d queued records lost", self._queue.qsize())
                self.lost += self._queue.qsize()
            return
        if self._task.done():
            await self._close_journal()
            return  # already stopped (stop() is idempotent)
        try:
            self._queue.put_nowait(_STOP)
        except asyncio.QueueFull:
            pass  # the task is not waiting on an empty queue, so it will see _stopping by itself
        try:
            await self._task
        except Exception:
            left = self._discard_queue()
            self.lost += left
            logger.exception("the writer task crashed; %d queued records lost", left)
        self.lost += self._discard_queue()  # only jobs that were still waiting for room, normally
        await self._close_journal()

    async def __aenter__(self) -> Writer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- the writer task -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._stopping.is_set() and self._queue.empty():
                return
            first = await self._queue.get()
            if first is _STOP:
                return
            if isinstance(first, _Job):
                await self._run_job(first)
                continue
            batch: list[RecordSource] = [first]  # type: ignore[list-item]
            self._in_hand = 1
            ended_by = await self._collect(batch)
            if self._abandon:
                self.lost += len(batch)
            else:
                try:
                    await self._process(batch)
                except Exception:
                    self.lost += len(batch)
                    logger.exception(
                        "unexpected error writing a batch of %d records; they are lost", len(batch)
                    )
            self._in_hand = 0
            if ended_by is _STOP:
                return
            if isinstance(ended_by, _Job):  # queued after the batch's records: runs after their commit
                await self._run_job(ended_by)

    async def _collect(self, batch: list[RecordSource]) -> object | None:
        """Add items to ``batch`` until it is full or the flush interval has passed; returns the _STOP or
        the write job that ended it early (None otherwise)."""
        deadline = time.monotonic() + self._flush_interval_s
        while len(batch) < self._batch_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if self._stopping.is_set() or remaining <= 0:
                    return None
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    return None
            if item is _STOP or isinstance(item, _Job):
                return item
            batch.append(item)  # type: ignore[arg-type]
            self._in_hand = len(batch)
        return None

    async def _process(self, batch: list[RecordSource]) -> None:
        records, failures = await asyncio.to_thread(build_all, batch)
        self.build_errors += failures
        await self._write(records)

    async def _write(self, records: list[Record]) -> None:
        """Write ``records`` as one batch, retrying until it succeeds or stop() gives up."""
        delay = self._backoff_initial_s
        grace_used = 0
        replacements: set[int] = set()
        while records:
            if self.instance is not None:  # before Redis and the alert engine see them too
                stamp_instance(records, self.instance)
            started_wall, started_mono = time.time(), time.monotonic()
            started = time.perf_counter()
            try:
                await self._store.write_batch(records)
            except RecordRejectedError as exc:
                if exc.indices is None and len(records) > 1:
                    for record in records:  # find the bad ones by writing one at a time
                        await self._write([record])
                    return
                records = self._replace_rejected(records, exc, replacements)
                continue
            except Exception as exc:
                # Dated from the attempt's start: a lock makes it wait busy_timeout before it fails.
                self.outage.failed(
                    exc, started_wall=started_wall, started_mono=started_mono, rows=len(records)
                )
                if self._stopping.is_set():
                    grace_used += 1
                    if grace_used > self._stop_grace_retries:
                        self._give_up(records)
                        return
                await self._backoff(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            self.last_batch_ms = elapsed_ms
            self._durations_ms.append(elapsed_ms)
            self.written += len(records)
            self.batches += 1
            self.outage.succeeded()
            self._offer_hot(records)
            return

    def _replace_rejected(
        self, records: list[Record], exc: RecordRejectedError, replacements: set[int]
    ) -> list[Record]:
        """Swap each rejected record for an internal ErrorRecord; drop a replacement rejected again."""
        bad = set(exc.indices) if exc.indices is not None else set(range(len(records)))
        kept: list[Record] = []
        for i, record in enumerate(records):
            if i not in bad:
                kept.append(record)
            elif id(record) in replacements:
                self.lost += 1
                logger.error("the store rejected even the internal error record %r; it is lost", record)
            else:
                self.rejected += 1
                logger.error("the store rejected a %s: %s", type(record).__name__, exc)
                replacement = internal_error(
                    f"the store rejected this {type(record).__name__}: {exc}",
                    request_id=getattr(record, "request_id", None),
                    stack=None,
                    model_name=getattr(record, "model_name", None),
                    endpoint=getattr(record, "endpoint", None),
                )
                replacements.add(id(replacement))
                kept.append(replacement)
        return kept

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay``, but at most 0.5 s once stopping so shutdown is not held up by long waits."""
        if self._stopping.is_set():
            await asyncio.sleep(min(delay, 0.5))
            return
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
        except TimeoutError:
            pass

    def _give_up(self, records: list[Record]) -> None:
        self._abandon = True
        left = self._discard_queue()
        self.lost += len(records) + left
        logger.error(
            "store still failing after %d retries at shutdown (%s): %d records lost",
            self._stop_grace_retries,
            self.last_error,
            len(records) + left,
        )

    def _discard_queue(self) -> int:
        count = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return count
            if isinstance(item, _Job):
                self._fail_job(item, "the writer stopped")
            elif item is not _STOP:
                count += 1

    def add_listener(self, view: HotView) -> None:
        """Also hand every stored batch to ``view`` (Redis, the alert engine, ...): non-blocking, best effort."""
        self._listeners.append(view)

    def _offer_hot(self, records: list[Record]) -> None:
        for view in self._listeners:
            try:
                view.offer(records)
            except Exception:
                logger.exception("%r refused a batch; ignored (the store has it)", view)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def batch_durations_ms(self) -> list[float]:
        """Durations of the last ~1000 successful batch writes, oldest first."""
        return list(self._durations_ms)

    def stats(self) -> dict[str, Any]:
        """Counters for the health endpoint and tests; ``last_error`` is ``{message, at}`` or None."""
        return {
            "queue_depth": self._queue.qsize(),
            "queue_size": self._queue_size,
            "in_hand": self._in_hand,
            "dropped": self.dropped,
            "written": self.written,
            "batches": self.batches,
            "failed_writes": self.failed_writes,
            "lost": self.lost,
            "rejected": self.rejected,
            "build_errors": self.build_errors,
            **self.outage.stats(),
            "last_batch_ms": self.last_batch_ms,
            # Over the last ~1000 batches: how long a commit holds the database (retention, a slow disk).
            "batch_ms_p99": exact_quantile(sorted(self._durations_ms), 0.99),
            "jobs": self.jobs,
            "job_errors": self.job_errors,
            "running": self._task is not None and not self._task.done(),
        }

    # -- the run journal -------------------------------------------------------------------------

    def _snapshot(self, *, clean: bool) -> dict[str, Any]:
        in_flight = 0
        if self._in_flight is not None:
            try:
                in_flight = int(self._in_flight())
            except Exception:  # a broken counter must not stop the journal
                logger.exception("the in-flight counter failed")
        depth = self._queue.qsize()
        return {
            "pid": os.getpid(),
            "started_at": iso_utc(self._started_wall),
            "updated_at": iso_utc(time.time()),
            "clean_shutdown": clean,
            "queued": depth + self._in_hand,
            "queue_depth": depth,
            "in_hand": self._in_hand,
            "in_flight": in_flight,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
        }

    async def _close_journal(self) -> None:
        if self._journal is None or self._journal_task is None:
            return
        task, self._journal_task = self._journal_task, None
        try:
            await task
        except Exception:
            logger.exception("the run journal task failed")
        await self._journal.close(self._snapshot(clean=True))
