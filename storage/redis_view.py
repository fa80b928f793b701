"""The optional Redis hot view: the latest requests and live per-model counters, for dashboards.

SQLite is the source of truth; this is a disposable copy fed after each stored batch. ``offer()`` only
appends to a bounded in-memory queue (oldest batches dropped when full), and one task pushes each batch in
a single MULTI/EXEC pipeline. Redis being slow or gone never reaches the request path: commands use short
timeouts and no client retries, a failed batch is dropped, and the task probes with back-off (0.5 s doubling
to 10 s) until Redis answers again. Keys are listed in docs/storage.md.

A push that times out may still have been applied (a Redis that hangs, then answers), so each pipeline also
sets a per-view sequence marker; once Redis answers again the marker says whether that batch landed, and
only a batch that did not is counted in ``failed_batches``. ``check()`` is the active health check: a PING,
cached for a second, bounded by the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import orjson

from storage.errors import StoreUnavailableError
from storage.records import INFERENCE_COLUMNS, ErrorRecord, InferenceRecord, Record
from storage.tasks import spawn

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["COUNTER_FIELDS", "RedisView", "close_redis_client"]

logger = logging.getLogger(__name__)

RedisStatus = Literal["ok", "down"]
_INT_FIELDS = ("requests", "success", "failed", "cancelled", "prompt_tokens", "completion_tokens")
COUNTER_FIELDS = (*_INT_FIELDS, "response_time_ms_sum", "last_seen")
UNKNOWN_MODEL = "unknown"


@dataclass(slots=True)
class _Tally:
    """Counters of one model (or of all) within one batch, applied with one command per field."""

    requests: int = 0
    success: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_time_ms_sum: float = 0.0
    last_seen: str = ""

    def add(self, r: InferenceRecord) -> None:
        self.requests += 1
        if r.success:
            self.success += 1
        else:
            self.failed += 1
        if r.cancelled:
            self.cancelled += 1
        self.prompt_tokens += r.prompt_tokens or 0
        self.completion_tokens += r.completion_tokens or 0
        self.response_time_ms_sum += r.response_time_ms or 0.0
        self.last_seen = max(self.last_seen, r.timestamp)


def _decode_counters(raw: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        text = v.decode() if isinstance(v, bytes) else str(v)
        if key in _INT_FIELDS or key == "errors":
            out[key] = int(text)
        elif key == "response_time_ms_sum":
            out[key] = float(text)
        else:
            out[key] = text
    return out


async def close_redis_client(client: Any, what: str, within_s: float = 2.0) -> None:
    """``client.aclose()`` within ``within_s``: a Redis that hangs, or a connection left half-open by an
    outage, must not hold up shutdown. Past the bound the sockets are dropped unread (the process is
    stopping, or the client is being replaced) and a warning says so."""
    try:
        async with asyncio.timeout(within_s):
            await client.aclose()
    except TimeoutError:
        logger.warning(
            "%s: closing the Redis client took over %.1f s; left to the garbage collector", what, within_s
        )
    except Exception as exc:  # a connection that fails to close cleanly is closed all the same
        logger.warning("%s: closing the Redis client: %s: %s", what, type(exc).__name__, exc)


class RedisView:
    """``HotView`` backed by Redis at ``url``; ``start()``/``stop()`` around its one task."""

    def __init__(
        self,
        url: str,
        *,
        recent: int = 1000,
        timeout_s: float = 0.25,
        key_prefix: str = "ollamon:",
        max_pending_batches: int = 1000,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        check_ttl_s: float = 1.0,
    ) -> None:
        self.url = url
        self._recent_cap = recent
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._pending: deque[list[Record]] = deque()
        self._max_pending = max_pending_batches
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._wake = asyncio.Event()
        self._poke = asyncio.Event()  # cuts a back-off sleep short (a health check saw Redis answer)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aioredis.Redis | None = None
        self._state: RedisStatus = "down"
        self._down_since: float | None = None
        self._last_drop_warn = -math.inf
        self._marker = f"{self._prefix}applied:{uuid.uuid4().hex[:16]}"
        self._seq = 0  # pushes attempted; each pipeline sets the marker to its number
        self._unconfirmed: int | None = None  # a push that failed without saying whether it was applied
        self._failed_at_down = 0
        self._check_ttl_s = check_ttl_s
        self._check_lock = asyncio.Lock()
        self._checked: RedisStatus | None = None
        self._checked_at = -math.inf
        self.dropped_batches = 0  # offered while the queue was full
        self.failed_batches = 0  # not applied in Redis (refused, lost, or not confirmed by stop())
        self.written_batches = 0
        self.last_error: str | None = None

    # -- keys ------------------------------------------------------------------------------------

    @property
    def key_recent(self) -> str:
        return f"{self._prefix}recent"

    @property
    def key_models(self) -> str:
        return f"{self._prefix}models"

    @property
    def key_totals(self) -> str:
        return f"{self._prefix}totals"

    def key_model(self, model_name: str) -> str:
        return f"{self._prefix}model:{model_name}"

    # -- the writer's side -----------------------------------------------------------------------

    def offer(self, records: Sequence[Record]) -> None:
        """Queue a stored batch for Redis; never blocks, drops the oldest batch when the queue is full."""
        if not records or self._stopping.is_set():
            return
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped_batches += 1
            now = time.monotonic()
            if now - self._last_drop_warn >= 10.0:
                self._last_drop_warn = now
                logger.warning("redis hot view is behind; %d batches dropped so far", self.dropped_batches)
        self._pending.append(list(records))
        self._wake.set()

    def status(self) -> RedisStatus:
        """``"ok"`` while the last command or probe succeeded, else ``"down"`` (passive: no I/O)."""
        return self._state

    async def check(self) -> RedisStatus:
        """PING Redis now, at most once per ``check_ttl_s`` (concurrent callers share one PING), bounded by
        the timeout: what is true when asked. A failure marks the view down; an answer while the push task
        waits out its back-off wakes it."""
        async with self._check_lock:
            if self._checked is not None and time.monotonic() - self._checked_at < self._check_ttl_s:
                return self._checked
            if self._client is None:
                result: RedisStatus = "down"
            elif await self._probe(self._timeout_s):
                result = "ok"
                if self._state == "down":  # let the push task probe now, not after its back-off
                    self._poke.set()
                    self._wake.set()
            else:
                result = "down"
                self._mark_down(self.last_error or "no answer to PING")
            self._checked, self._checked_at = result, time.monotonic()
            return result

    def stats(self) -> dict[str, Any]:
        return {
            "status": self._state,
            "pending_batches": len(self._pending),
            "dropped_batches": self.dropped_batches,
            "failed_batches": self.failed_batches,
            "written_batches": self.written_batches,
            "last_error": self.last_error,
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (a failure only marks the view down) and spawn the push task."""
        if self._task is not None:
            return
        # Imported here: redis-py (and the OpenTelemetry SDK it pulls in) costs ~9 MiB of RSS that a
        # deployment without Redis (the shipped config) should not hold.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = aioredis.Redis.from_url(
            self.url,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            retry=Retry(NoBackoff(), 0),  # a hung Redis must cost one timeout, not a retry storm
            health_check_interval=0,
        )
        if await self._probe():
            self._state = "ok"
        else:
            self._mark_down(self.last_error or "no answer")
        self._task = spawn(self._run(), name="storage-redis-view")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Push what is pending if Redis is up (within ``flush_timeout_s``), then disconnect."""
        self._stopping.set()
        self._wake.set()
        self._poke.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, flush_timeout_s)
            except TimeoutError:
                logger.warning("redis hot view: flush timed out; %d batches not pushed", len(self._pending))
            self._task = None
        if self._client is not None:
            await close_redis_client(self._client, "redis hot view")
            self._client = None

    async def __aenter__(self) -> RedisView:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- the push task ---------------------------------------------------------------------------

    def _require(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreUnavailableError(f"redis hot view at {self.url} is not started")
        return self._client

    async def _probe(self, within_s: float | None = None) -> bool:
        try:
            async with asyncio.timeout(within_s or self._timeout_s * 2):
                await self._require().ping()
        except Exception as exc:  # any failure to answer means down; the reason goes to the log
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def _mark_down(self, reason: str) -> None:
        if self._state == "ok" or self._down_since is None:
            self._down_since = time.monotonic()
            self._failed_at_down = self.failed_batches
            logger.warning("redis hot view at %s is down (%s); SQLite keeps every record", self.url, reason)
        self._state = "down"

    def _mark_up(self) -> None:
        if self._state == "down":
            logger.warning(
                "redis hot view at %s is back after %.1f s; %d batches were not pushed meanwhile",
                self.url,
                time.monotonic() - (self._down_since or time.monotonic()),
                self.failed_batches - self._failed_at_down,
            )
        self._state = "ok"
        self._down_since = None

    async def _come_back(self) -> bool:
        """Probe; when Redis answers, settle the unconfirmed push (applied or not) and mark the view up."""
        if not await self._probe():
            return False
        if self._unconfirmed is not None:
            try:
                async with asyncio.timeout(self._timeout_s * 2):
                    raw = await self._require().get(self._marker)
                applied = int(raw) if raw is not None else 0
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                return False
            if applied >= self._unconfirmed:
                self.written_batches += 1  # it timed out on our side, but Redis applied it
            else:
                self.failed_batches += 1
            self._unconfirmed = None
        self._mark_up()
        return True

    async def _run(self) -> None:
        delay = self._backoff_initial_s
        last_try = False
        while True:
            if self._stopping.is_set() and (self._state == "down" or not self._pending):
                if self._state == "ok" or last_try:
                    break
                last_try = True  # one more probe, so a batch that did land is not counted as lost
            if self._state == "down":
                if await self._come_back():
                    delay = self._backoff_initial_s
                elif not self._stopping.is_set():
                    await self._sleep(delay)
                    delay = min(delay * 2, self._backoff_max_s)
                continue
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending.popleft()
            self._seq += 1
            try:
                await self._push(batch, self._seq)
            except (TypeError, ValueError) as exc:  # a value orjson cannot encode: this batch only
                self.failed_batches += 1
                logger.error("redis hot view: cannot encode a batch (%s); skipped", exc)
            except Exception as exc:  # connection refused, timeout, server error: Redis is down
                self._unconfirmed = self._seq  # settled by _come_back() once Redis answers
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._mark_down(self.last_error)
            else:
                self.written_batches += 1
        if self._unconfirmed is not None:
            self.failed_batches += 1  # never confirmed: count it as not pushed
            self._unconfirmed = None
        self.failed_batches += len(self._pending)
        self._pending.clear()

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._poke.wait(), delay)
        except TimeoutError:
            pass
        if not self._stopping.is_set():
            self._poke.clear()

    async def _push(self, batch: list[Record], seq: int) -> None:
        """One MULTI/EXEC per batch: the recent list, per-model counters, totals, and the marker ``seq``."""
        inference = [r for r in batch if isinstance(r, InferenceRecord)]
        errors = sum(1 for r in batch if isinstance(r, ErrorRecord))
        rows = [orjson.dumps({c: getattr(r, c) for c in INFERENCE_COLUMNS}) for r in inference]
        per_model: dict[str, _Tally] = {}
        totals = _Tally()
        for r in inference:
            per_model.setdefault(r.model_name or UNKNOWN_MODEL, _Tally()).add(r)
            totals.add(r)
        pipe = self._require().pipeline(transaction=True)
        if rows:
            pipe.lpush(self.key_recent, *rows)
            pipe.ltrim(self.key_recent, 0, self._recent_cap - 1)
            for model, tally in per_model.items():
                self._queue_tally(pipe, self.key_model(model), tally)
            pipe.sadd(self.key_models, *per_model)
            self._queue_tally(pipe, self.key_totals, totals)
        if errors:
            pipe.hincrby(self.key_totals, "errors", errors)
        pipe.set(self._marker, seq, ex=86400)
        async with asyncio.timeout(self._timeout_s * 4):
            await pipe.execute()

    @staticmethod
    def _queue_tally(pipe: Any, key: str, t: _Tally) -> None:
        for field in _INT_FIELDS:
            value = getattr(t, field)
            if value:
                pipe.hincrby(key, field, value)
        pipe.hincrbyfloat(key, "response_time_ms_sum", t.response_time_ms_sum)
        pipe.hset(key, "last_seen", t.last_seen)

    # -- reading ---------------------------------------------------------------------------------

    async def recent(self, n: int = 100) -> list[dict[str, Any]]:
        """The ``n`` newest inference rows (newest first); raises ``StoreUnavailableError`` if Redis is down."""
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                raw = await self._require().lrange(self.key_recent, 0, max(n, 1) - 1)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(f"redis at {self.url}: {type(exc).__name__}: {exc}") from exc
        return [orjson.loads(v) for v in raw]

    async def counters(self) -> dict[str, dict[str, Any]]:
        """Live counters per model (``COUNTER_FIELDS``); raises ``StoreUnavailableError`` if Redis is down."""
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                client = self._require()
                names = sorted(
                    m.decode() if isinstance(m, bytes) else str(m)
                    for m in await client.smembers(self.key_models)
                )
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(self.key_model(name))
                hashes = await pipe.execute() if names else []
        except StoreUnavailableError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(f"redis at {self.url}: {type(exc).__name__}: {exc}") from exc
        return {name: _decode_counters(h) for name, h in zip(names, hashes, strict=True)}

    async def totals(self) -> dict[str, Any]:
        """Counters over all models, plus ``errors`` (standalone error records)."""
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                raw = await self._require().hgetall(self.key_totals)
        except Exception as exc:
            raise StoreUnavailableError(f"redis at {self.url}: {type(exc).__name__}: {exc}") from exc
        return _decode_counters(raw)
