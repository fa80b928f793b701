"""The resource sampler: one background task that samples the host and the GPUs on a drift-free schedule.

Sample ``k`` is due at ``start + k * interval``; a slow sample never shifts the ones after it (a tick that
is missed entirely is skipped and counted in ``skipped``). psutil runs on one dedicated thread and NVML on
another (``GpuMonitor``), each with at most one call in flight, so a hung mount or driver delays nothing
but its own readings. Every sample is kept in memory (the live view, ``/ollamon/api/system``), handed to
listeners (the alert engine), to the energy meter, and to Redis when it is on; one in every
``store_every_s`` goes to SQLite through the writer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.resources.energy import EnergyMeter
from proxy.resources.nvml import GpuMonitor, GpuReading, throttle_names
from proxy.resources.system_stats import SystemReader
from storage.redis_view import RedisView, close_redis_client
from storage.resources import GpuSample, SystemSample
from storage.tasks import spawn
from storage.writer import Writer

__all__ = ["SAMPLER_KEY", "Listener", "RedisLatest", "Sampler", "Snapshot", "flat_view"]

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, float]], None]

_FLAT_SYSTEM = (
    "cpu_percent",
    "memory_percent",
    "swap_percent",
    "disk_percent",
    "disk_free_gb",
    "load_1m",
    "net_sent_bytes_per_s",
    "net_recv_bytes_per_s",
    "process_rss_mb",
    "process_cpu_percent",
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One sample: the host, and the GPUs (``gpus`` None when no GPU reading was available)."""

    mono: float  # event-loop time of the sample
    system: SystemSample
    gpus: tuple[GpuSample, ...] | None


def flat_view(snap: Snapshot) -> dict[str, float]:
    """The listener dict: host numbers, and GPU maxima (power: sum) when a GPU is visible."""
    out: dict[str, float] = {}
    for key in _FLAT_SYSTEM:
        value = getattr(snap.system, key)
        if value is not None:
            out[key] = float(value)
    if snap.gpus:
        out["gpu_count"] = float(len(snap.gpus))
        for key, attr in (
            ("gpu_temperature_c", "temperature_c"),
            ("gpu_utilization_percent", "utilization_percent"),
            ("gpu_memory_percent", "memory_percent"),
        ):
            values = [v for g in snap.gpus if (v := getattr(g, attr)) is not None]
            if values:
                out[key] = max(values)
        powers = [g.power_w for g in snap.gpus if g.power_w is not None]
        if powers:
            out["gpu_power_w"] = sum(powers)
    return out


def _gpu_sample(timestamp: str, r: GpuReading) -> GpuSample:
    return GpuSample(
        timestamp=timestamp,
        gpu_index=r.index,
        name=r.name,
        uuid=r.uuid,
        temperature_c=r.temperature_c,
        utilization_percent=r.utilization_percent,
        memory_utilization_percent=r.memory_utilization_percent,
        memory_used_mb=r.memory_used_mb,
        memory_total_mb=r.memory_total_mb,
        memory_percent=r.memory_percent,
        power_w=r.power_w,
        power_limit_w=r.power_limit_w,
        sm_clock_mhz=r.sm_clock_mhz,
        throttle_reasons=throttle_names(r.throttle_reasons_mask),
        processes=None if r.processes is None else list(r.processes),
        throttle_reasons_mask=r.throttle_reasons_mask,
    )


class RedisLatest:
    """Keeps the latest sample under one Redis key (``SET ... EX``), only while the hot view is up.

    It has its own small client with the hot view's settings (short timeouts, no retries): RedisView
    exposes no client, and one SET a second does not need its batching.
    """

    def __init__(self, view: RedisView, *, timeout_s: float, key: str = "ollamon:system:latest") -> None:
        self.view = view
        self.key = key
        self._timeout_s = timeout_s
        # Imported here: redis-py (and the OpenTelemetry SDK it pulls in) costs ~9 MiB of RSS that a
        # deployment without Redis (the shipped config) should not hold.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = aioredis.Redis.from_url(
            view.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._failing = False

    async def put(self, payload: bytes, ttl_s: int) -> None:
        if self.view.status() != "ok":
            return  # the hot view probes with back-off; do not hammer a Redis it knows is down
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                await self._client.set(self.key, payload, ex=ttl_s)
        except Exception as exc:  # any failure: skip this sample, say so once
            if not self._failing:
                logger.warning("cannot keep the latest sample in Redis (%s: %s)", type(exc).__name__, exc)
            self._failing = True
        else:
            self._failing = False

    async def close(self) -> None:
        await close_redis_client(self._client, "latest system sample")


class Sampler:
    """Samples every ``interval_s``; ``start()``/``stop()`` around its one task."""

    def __init__(
        self,
        reader: SystemReader,
        *,
        interval_s: float = 1.0,
        store_every_s: float = 10.0,
        gpu: GpuMonitor | None = None,
        writer: Writer | None = None,
        meter: EnergyMeter | None = None,
        redis: RedisLatest | None = None,
        memory_window_s: float = 900.0,
    ) -> None:
        self.reader = reader
        self.interval_s = interval_s
        self.store_every_s = store_every_s
        self.gpu = gpu
        self.writer = writer
        self.meter = meter
        self.redis = redis
        self.memory_window_s = memory_window_s
        self._every = max(1, round(store_every_s / interval_s))
        self._history: deque[Snapshot] = deque(maxlen=max(1, math.ceil(memory_window_s / interval_s)))
        self._listeners: list[Listener] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ollamon-psutil")
        self._pending: asyncio.Future[SystemSample] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._start = 0.0
        self._stored_bucket = -1
        self._stuck_logged = False
        self._failing = False
        self.tick = -1  # index of the last sample taken
        self.samples = 0
        self.stored = 0
        self.skipped = 0
        self.failures = 0

    # -- API -------------------------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(flat)`` after each sample, on the event loop (it must be cheap and not raise)."""
        self._listeners.append(fn)

    @property
    def latest(self) -> Snapshot | None:
        return self._history[-1] if self._history else None

    def history(self, seconds: float) -> list[Snapshot]:
        """Samples of the last ``seconds`` (at most ``memory_window_s``), oldest first."""
        if not self._history:
            return []
        cutoff = self._history[-1].mono - seconds
        return [s for s in self._history if s.mono > cutoff]

    def scheduled_time(self, tick: int) -> float:
        """Event-loop time at which sample ``tick`` was due."""
        return self._start + tick * self.interval_s

    def status(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "interval_s": self.interval_s,
            "store_every_s": self.store_every_s,
            "samples": self.samples,
            "stored": self.stored,
            "skipped": self.skipped,
            "failures": self.failures,
            "last_sample": latest.system.timestamp if latest else None,
            "gpu": self.gpu.status() if self.gpu is not None else {"state": "disabled"},
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="resource-sampler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.gpu is not None:
            await self.gpu.close()
        if self.redis is not None:
            await self.redis.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._start = loop.time()
        tick = 0
        while not self._stop.is_set():
            self.tick = tick
            try:
                await self._sample(loop.time())
            except Exception:
                self.failures += 1
                if not self._failing:  # one line (with the stack) per run of failures, not one a second
                    logger.exception("resource sampling failed; retrying at every interval")
                self._failing = True
            else:
                if self._failing:
                    logger.info("resource sampling works again after %d failures", self.failures)
                self._failing = False
            # Drift-free: the next due time is computed from the start, never from "now".
            now = loop.time()
            next_tick = tick + 1
            if self.scheduled_time(next_tick) < now:
                late = math.floor((now - self._start) / self.interval_s) + 1
                self.skipped += late - next_tick
                next_tick = late
            tick = next_tick
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.scheduled_time(tick) - loop.time()))
            except TimeoutError:
                pass

    # -- one sample ------------------------------------------------------------------------------

    async def _read_system(self) -> SystemSample | None:
        if self._pending is not None:
            if not self._pending.done():
                if not self._stuck_logged:
                    self._stuck_logged = True
                    logger.warning("a psutil read has not returned (a hung mount?); host samples skipped")
                return None
            if not self._pending.cancelled() and self._pending.exception() is not None:
                logger.debug("a late psutil read failed: %s", self._pending.exception())
        self._stuck_logged = False
        loop = asyncio.get_running_loop()
        self._pending = fut = loop.run_in_executor(self._executor, self.reader.read)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.5, min(2.0, self.interval_s)))
        except TimeoutError:
            return None

    async def _sample(self, mono: float) -> None:
        gpu_read = self.gpu.read() if self.gpu is not None else None
        system_task = self._read_system()
        if gpu_read is not None:
            system, readings = await asyncio.gather(system_task, gpu_read)
        else:
            system, readings = await system_task, None
        if self.meter is not None:
            self._feed_meter(readings)
        if system is None:
            return
        gpus = None
        if readings is not None:
            system.gpu_count = len(readings)
            gpus = tuple(_gpu_sample(system.timestamp, r) for r in readings)
        snap = Snapshot(mono=mono, system=system, gpus=gpus)
        self._history.append(snap)
        self.samples += 1
        flat = flat_view(snap)
        for fn in self._listeners:
            try:
                fn(flat)
            except Exception:
                logger.exception("sampler listener %r failed; ignored", fn)
        bucket = self.tick // self._every
        if self.writer is not None and bucket != self._stored_bucket:
            self._stored_bucket = bucket
            self.writer.submit(system)
            for g in gpus or ():
                self.writer.submit(g)
            self.stored += 1
        if self.redis is not None:
            payload = orjson.dumps({"system": system, "gpus": gpus})
            await self.redis.put(payload, ttl_s=max(5, math.ceil(self.interval_s * 5)))

    def _feed_meter(self, readings: list[GpuReading] | None) -> None:
        assert self.meter is not None
        if not readings:
            self.meter.update(None, None)
            return
        powers = [r.power_w for r in readings if r.power_w is not None]
        memory = [r.memory_used_mb for r in readings if r.memory_used_mb is not None]
        self.meter.update(sum(powers) if powers else None, sum(memory) if memory else None)


SAMPLER_KEY = web.AppKey("sampler", Sampler)
