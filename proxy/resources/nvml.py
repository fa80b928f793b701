"""The GPU edge: a thin provider seam over NVML, and the monitor that calls it safely from the event loop.

``GpuProvider`` is the seam: ``PynvmlProvider`` talks to the real driver through ``pynvml`` (the
``nvidia-ml-py`` package); ``RecordedProvider`` replays recorded readings so everything above it is tested
on machines without a GPU. ``GpuMonitor`` runs every provider call on one dedicated thread (an NVML call
can block for seconds when a GPU misbehaves), keeps at most one call in flight, and turns "no GPU", "no
driver" and "NVML failed mid-run" into one clear log line, absent GPU fields, and retries with back-off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "GpuMonitor",
    "GpuProvider",
    "GpuReading",
    "GpuUnavailable",
    "PynvmlProvider",
    "throttle_names",
]

logger = logging.getLogger(__name__)

_MIB = 1024.0 * 1024.0
# NVML's clock event (throttle) reason bits, named as in nvml.h without the prefix.
_THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def throttle_names(mask: int | None) -> str | None:
    """``0x44`` -> ``"sw_power_cap,hw_thermal_slowdown"``; ``0`` -> ``""``; unknown bits as hex."""
    if mask is None:
        return None
    names = [name for bit, name in _THROTTLE_BITS if mask & bit]
    rest = mask & ~sum(bit for bit, _ in _THROTTLE_BITS)
    if rest:
        names.append(hex(rest))
    return ",".join(names)


class GpuUnavailable(Exception):
    """NVML cannot be used now (no library, no driver, no GPU, or a failure mid-run); the message says why."""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """What NVML said about one GPU at one instant; None where the device does not expose a value."""

    index: int
    name: str | None = None
    uuid: str | None = None
    temperature_c: float | None = None
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    throttle_reasons_mask: int | None = None
    processes: tuple[dict[str, Any], ...] | None = None

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_mb is None or not self.memory_total_mb:
            return None
        return 100.0 * self.memory_used_mb / self.memory_total_mb


class GpuProvider(Protocol):
    """Blocking access to the GPUs; every method may raise ``GpuUnavailable``. Called from one thread."""

    def open(self) -> None:
        """Initialise the library (``nvmlInit``)."""

    def read(self) -> list[GpuReading]:
        """One reading per GPU, index order."""

    def close(self) -> None:
        """Release the library (``nvmlShutdown``); never raises."""


class PynvmlProvider:
    """The real driver through ``pynvml``. Values a device does not support are None, not errors."""

    def __init__(self) -> None:
        self._nvml: Any = None

    def open(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # the dependency is declared, but a broken install must not crash serve
            raise GpuUnavailable(f"pynvml is not importable ({exc}); install nvidia-ml-py") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML init failed: {type(exc).__name__}: {exc}") from exc
        self._nvml = pynvml

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            raise GpuUnavailable("NVML is not initialised")
        try:
            count = int(nvml.nvmlDeviceGetCount())
            return [self._device(nvml, i) for i in range(count)]
        except nvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML read failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _device(nvml: Any, index: int) -> GpuReading:
        h = nvml.nvmlDeviceGetHandleByIndex(index)
        # Only "this device cannot tell" becomes None; anything else (GPU lost, driver gone) fails the read.
        quiet = (nvml.NVMLError_NotSupported, nvml.NVMLError_NoPermission)

        def opt(fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(h, *args)
            except quiet:
                return None

        def text(value: Any) -> str | None:
            return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))

        util = opt(nvml.nvmlDeviceGetUtilizationRates)
        mem = _memory_info(nvml, h, quiet)
        power_mw = opt(nvml.nvmlDeviceGetPowerUsage)
        limit_mw = opt(nvml.nvmlDeviceGetEnforcedPowerLimit)
        reasons_fn = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        procs = opt(nvml.nvmlDeviceGetComputeRunningProcesses)
        return GpuReading(
            index=index,
            name=text(opt(nvml.nvmlDeviceGetName)),
            uuid=text(opt(nvml.nvmlDeviceGetUUID)),
            temperature_c=_num(opt(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)),
            utilization_percent=None if util is None else float(util.gpu),
            memory_utilization_percent=None if util is None else float(util.memory),
            memory_used_mb=None if mem is None else mem.used / _MIB,
            memory_total_mb=None if mem is None else mem.total / _MIB,
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            sm_clock_mhz=_num(opt(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)),
            throttle_reasons_mask=None if (m := opt(reasons_fn)) is None else int(m),
            processes=None if procs is None else tuple(_process(p) for p in procs),
        )


def _memory_info(nvml: Any, h: Any, quiet: tuple[type[BaseException], ...]) -> Any:
    """Memory as nvidia-smi shows it: the v2 call, whose ``used`` leaves out what the driver reserves.

    The v1 call counts the reserved part as used (615 MiB on an idle H200 where nvidia-smi shows 0 MiB, read
    on real hardware); drivers or bindings without v2 fall back to it.
    """
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        absent = (*quiet, getattr(nvml, "NVMLError_FunctionNotFound", nvml.NVMLError_NotSupported))
        try:
            return nvml.nvmlDeviceGetMemoryInfo(h, version=version)
        except absent:
            pass
    try:
        return nvml.nvmlDeviceGetMemoryInfo(h)
    except quiet:
        return None


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _process(p: Any) -> dict[str, Any]:
    used = getattr(p, "usedGpuMemory", None)
    return {"pid": int(p.pid), "used_memory_mb": None if used is None else used / _MIB}


class GpuMonitor:
    """Reads a provider from the event loop: one thread, one call in flight, back-off while unavailable."""

    def __init__(
        self,
        provider: GpuProvider,
        *,
        call_timeout_s: float = 2.0,
        backoff_initial_s: float = 5.0,
        backoff_max_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.call_timeout_s = call_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ollamon-nvml")
        self._pending: asyncio.Future[list[GpuReading]] | None = None
        self._opened = False
        self._ever_worked = False
        self.state = "starting"  # starting | ok | unavailable
        self.reason: str | None = None
        self.gpu_count = 0
        self.failures = 0
        self._delay = backoff_initial_s
        self._retry_at = 0.0
        self._hung_logged = False

    def _call(self) -> list[GpuReading]:
        if not self._opened:
            self.provider.open()
            self._opened = True
        try:
            return self.provider.read()
        except GpuUnavailable:
            # Re-initialise from scratch on the next try: a driver reload invalidates every handle.
            self._opened = False
            self.provider.close()
            raise

    async def read(self) -> list[GpuReading] | None:
        """The GPUs now, or None (no GPU, backing off, or the previous call has not returned yet)."""
        if self._pending is not None:
            if not self._pending.done():
                if not self._hung_logged:
                    self._hung_logged = True
                    logger.warning("an NVML call has not returned; GPU samples skipped until it does")
                return None
            late = self._pending
            self._pending = None
            if not late.cancelled() and late.exception() is not None:  # a call that outlived its timeout
                self._failed(str(late.exception()))
                return None
        if self.state == "unavailable" and self._clock() < self._retry_at:
            return None
        loop = asyncio.get_running_loop()
        self._pending = fut = loop.run_in_executor(self._executor, self._call)
        try:
            readings = await asyncio.wait_for(asyncio.shield(fut), self.call_timeout_s)
        except TimeoutError:
            return None  # still running; the next read() sees it pending (and its outcome)
        except GpuUnavailable as exc:
            self._pending = None
            self._failed(str(exc))
            return None
        except Exception as exc:  # a bug in a provider must not kill the sampler
            self._pending = None
            self._failed(f"{type(exc).__name__}: {exc}")
            return None
        self._pending = None
        return self._succeeded(readings)

    def _succeeded(self, readings: list[GpuReading]) -> list[GpuReading]:
        self._hung_logged = False
        if self.state != "ok":
            logger.info("GPU sampling on: %d GPU(s) through NVML", len(readings))
        self.state, self.reason, self.gpu_count = "ok", None, len(readings)
        self._ever_worked = True
        self._delay = self.backoff_initial_s
        return readings

    def _failed(self, reason: str) -> None:
        self.failures += 1
        first = self.state != "unavailable"
        self.state, self.reason, self.gpu_count = "unavailable", reason, 0
        if first:
            self._delay = self.backoff_initial_s
        delay = self._delay
        self._retry_at = self._clock() + delay
        self._delay = min(self._delay * 2, self.backoff_max_s)
        if first:
            # One line per outage; the retries below it log at debug level only.
            level = logging.WARNING if self._ever_worked else logging.INFO
            logger.log(
                level,
                "GPU sampling off: %s; GPU fields are absent; retrying in %.0f s, backing off to %.0f s",
                reason,
                delay,
                self.backoff_max_s,
            )
        else:
            logger.debug("NVML still unavailable (%s); next try in %.0f s", reason, delay)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "gpus": self.gpu_count, "reason": self.reason, "failures": self.failures}

    async def close(self) -> None:
        """Release NVML on its thread and stop the thread (without waiting for a hung call)."""
        loop = asyncio.get_running_loop()
        if self._opened and (self._pending is None or self._pending.done()):
            try:
                await asyncio.wait_for(loop.run_in_executor(self._executor, self.provider.close), 2.0)
            except TimeoutError:
                logger.warning("nvmlShutdown did not return within 2 s")
            self._opened = False
        self._executor.shutdown(wait=False, cancel_futures=True)
