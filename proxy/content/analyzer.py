"""The content analyzer: a bounded queue of committed requests, analysed by a few background workers.

``offer(records)`` is a writer listener: called on the loop with every committed batch, it only samples
and enqueues (``put_nowait``); a full queue drops the request and counts it. Workers run the local checks
(PII, language, lexical scores) in one worker process, so analysis never takes more than one core and
never holds the GIL the event loop needs, and ask the guard model over HTTP. Each check has a
timeout; every outcome, failures included, becomes one ``ContentRecord`` submitted to the writer.

The text exists only in memory here (``InferenceRecord.content_text``); what is stored is kinds, counts,
languages and verdicts.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from proxy.content import language, lexical, pii
from proxy.content.guard import GuardClient, GuardError
from proxy.content.rates import ContentRates
from storage.content import ContentRecord
from storage.records import InferenceRecord, Record, iso_utc
from storage.tasks import spawn

__all__ = ["ContentAnalyzer", "Job", "LocalResult", "analyse_local"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    """One request waiting for analysis."""

    request_id: str
    timestamp: str
    prompt: str
    response: str


@dataclass(slots=True)
class LocalResult:
    """What the local checks found."""

    prompt_pii: dict[str, int] | None = None
    response_pii: dict[str, int] | None = None
    prompt_language: tuple[str, float] | None = None
    response_language: tuple[str, float] | None = None
    toxicity: float | None = None
    sentiment: float | None = None


def analyse_local(job: Job, *, with_pii: bool, with_language: bool, with_lexical: bool) -> LocalResult:
    """The CPU part of one analysis (runs in the analyzer's worker process)."""
    out = LocalResult()
    if with_pii:
        out.prompt_pii = pii.counts(job.prompt)
        out.response_pii = pii.counts(job.response)
    if with_language:
        out.prompt_language = language.detect(job.prompt)
        out.response_language = language.detect(job.response)
    if with_lexical:
        out.toxicity, out.sentiment = lexical.scores(f"{job.prompt}\n{job.response}")
    return out


def _warm_up() -> None:
    """Load the language model and the sentiment lexicon when the worker process starts (~1 s)."""
    language.detect("warm up the language model")
    lexical.scores("warm up the lexicon")


def _run_local(
    job: Job, with_pii: bool, with_language: bool, with_lexical: bool
) -> tuple[LocalResult, float]:
    """``analyse_local`` in the worker process, with the CPU time it took (ms)."""
    cpu = time.process_time()
    result = analyse_local(job, with_pii=with_pii, with_language=with_language, with_lexical=with_lexical)
    return result, (time.process_time() - cpu) * 1000


class ContentAnalyzer:
    """Samples committed records into a bounded queue and writes one ``ContentRecord`` per analysis."""

    def __init__(
        self,
        submit: Callable[[Record], bool],
        *,
        guard: GuardClient | None = None,
        sample_rate: float = 1.0,
        queue_size: int = 1000,
        timeout_s: float = 10.0,
        with_pii: bool = True,
        with_language: bool = True,
        max_text_chars: int = 20000,
        workers: int = 4,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._submit = submit
        self.guard = guard
        self.sample_rate = sample_rate
        self.timeout_s = timeout_s
        self.with_pii = with_pii
        self.with_language = with_language
        self.max_text_chars = max_text_chars
        self._chance = chance
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._queue_size = queue_size
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        # One worker process: the checks are pure Python (libphonenumber, VADER), and in a thread they
        # would hold the GIL against the event loop that serves requests. Started at the first job.
        self._pool = self._new_pool()
        self.offered = 0
        self.sampled_out = 0
        self.dropped = 0
        self.analysed = 0
        self.failed = 0
        self.skipped = 0
        self.guard_failures = 0
        self.local_ms_total = 0.0  # wall time of the local checks, queueing for the process included
        self.local_cpu_ms_total = 0.0  # CPU time of the local checks (the worker process's clock)
        self.last_error: str | None = None
        self.rates = ContentRates()  # the last five minutes, for the alert engine

    @staticmethod
    def _new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_up
        )

    # -- the writer listener (on the loop, must return at once) ------------------------------------

    def offer(self, records: Sequence[Record]) -> None:
        """Enqueue the committed inference records that carry text; never blocks, never raises."""
        for rec in records:
            if not isinstance(rec, InferenceRecord) or rec.content_text is None:
                continue
            prompt, response = rec.content_text
            rec.content_text = None  # the text lives on in the job only
            self.offered += 1
            if self.sample_rate < 1.0 and self._chance() >= self.sample_rate:
                self.sampled_out += 1
                continue
            job = Job(
                rec.request_id,
                rec.timestamp,
                (prompt or "")[: self.max_text_chars],
                (response or "")[: self.max_text_chars],
            )
            try:
                self._queue.put_nowait(job)
            except asyncio.QueueFull:
                self.dropped += 1

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers (once)."""
        if not self._tasks:
            self._tasks = [spawn(self._work(), name=f"content-analyzer-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        """Stop the workers; what is still queued is not analysed (it is counted in ``dropped``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.dropped += self._queue.qsize()
        # Waits for the one job the process may be running (bounded by its timeout's worth of work).
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    # -- the workers -------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                record = await self.analyse(job)
            except Exception:  # a bug must not kill the worker
                logger.exception("content analysis of %s failed unexpectedly", job.request_id)
                record = self._record(job, "failed", "internal error (see the log)")
            self._count(record)
            self.rates.add(record)
            self._submit(record)

    def _count(self, record: ContentRecord) -> None:
        if record.status == "ok":
            self.analysed += 1
        elif record.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            self.last_error = record.error

    @staticmethod
    def _record(job: Job, status: str, error: str | None = None) -> ContentRecord:
        return ContentRecord(job.request_id, job.timestamp, iso_utc(time.time()), status, error)

    async def analyse(self, job: Job) -> ContentRecord:
        """Every check on one job; failures are recorded on the row, never raised."""
        if not job.prompt and not job.response:
            return self._record(job, "skipped", "no text")
        started = time.perf_counter()
        record = self._record(job, "ok")
        errors: list[str] = []
        local = await self._local(job, errors)
        if local is not None:
            _fill_local(record, local)
        if self.guard is not None:
            record.guard_model = self.guard.model
            try:
                verdict, latency_ms = await asyncio.wait_for(
                    self.guard.judge(job.prompt, job.response), self.timeout_s
                )
            except (GuardError, TimeoutError) as exc:
                self.guard_failures += 1
                errors.append(f"guard: {exc or 'timed out'}")
            else:
                record.verdict = verdict.verdict
                record.categories = list(verdict.categories)
                record.guard_latency_ms = round(latency_ms, 3)
        record.analysis_ms = round((time.perf_counter() - started) * 1000, 3)
        if errors:
            record.status, record.error = "failed", "; ".join(errors)
        return record

    async def _local(self, job: Job, errors: list[str]) -> LocalResult | None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        flags = (self.with_pii, self.with_language, self.guard is None)
        pool = self._pool
        try:
            result, cpu_ms = await asyncio.wait_for(
                loop.run_in_executor(pool, _run_local, job, *flags), self.timeout_s
            )
            self.local_cpu_ms_total += cpu_ms
            return result
        except TimeoutError:
            errors.append(f"local checks took over {self.timeout_s:g} s")
        except BrokenProcessPool:  # the worker died (killed, out of memory): the next job gets a new one
            if self._pool is pool:  # the first worker to notice replaces it, once
                logger.error("the content analysis worker process died; starting a new one")
                pool.shutdown(wait=False)
                self._pool = self._new_pool()
            errors.append("local checks failed: the worker process died")
        except Exception as exc:
            logger.exception("content checks of %s failed", job.request_id)
            errors.append(f"local checks failed: {type(exc).__name__}")
        finally:
            self.local_ms_total += (time.perf_counter() - started) * 1000
        return None

    def stats(self) -> dict[str, Any]:
        """Counters for /ollamon/health."""
        done = self.analysed + self.failed + self.skipped
        return {
            "enabled": True,
            "guard_model": self.guard.model if self.guard is not None else None,
            "queue_depth": self._queue.qsize(),
            "queue_size": self._queue_size,
            "offered": self.offered,
            "sampled_out": self.sampled_out,
            "dropped": self.dropped,
            "analysed": self.analysed,
            "failed": self.failed,
            "skipped": self.skipped,
            "guard_failures": self.guard_failures,
            "local_ms_mean": round(self.local_ms_total / done, 3) if done else None,
            "local_cpu_ms_mean": round(self.local_cpu_ms_total / done, 3) if done else None,
            "last_error": self.last_error,
        }


def _fill_local(record: ContentRecord, local: LocalResult) -> None:
    record.prompt_pii, record.response_pii = local.prompt_pii, local.response_pii
    if local.prompt_pii is not None and local.response_pii is not None:
        record.pii_count = sum(local.prompt_pii.values()) + sum(local.response_pii.values())
    if local.prompt_language is not None:
        record.prompt_language, record.prompt_language_confidence = local.prompt_language
    if local.response_language is not None:
        record.response_language, record.response_language_confidence = local.response_language
    record.toxicity, record.sentiment = local.toxicity, local.sentiment
