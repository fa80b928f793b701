"""The GPU edge. These tests fake only what sits behind the provider seam (a recorded pynvml module, or
recorded readings); the monitor, its thread, back-off and logging are the real code."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import threading
import time
import types
from typing import Any

import pytest

from proxy.resources.nvml import (
    GpuMonitor,
    GpuReading,
    GpuUnavailable,
    PynvmlProvider,
    throttle_names,
)
from tests.fixtures.gpu import RecordedProvider

READING = GpuReading(index=0, name="Recorded", power_w=100.0, memory_used_mb=1000.0, memory_total_mb=4000.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_pynvml_provider_on_this_machine() -> None:
    """Where the driver exists the real provider reads every GPU; where it does not, it says why."""
    provider = PynvmlProvider()
    if _nvml_library_present():
        provider.open()
        try:
            readings = provider.read()
        finally:
            provider.close()
        assert readings and all(r.memory_total_mb and r.name for r in readings)
    else:
        with pytest.raises(GpuUnavailable, match="NVML"):
            provider.open()


def _fake_pynvml(lost: list[bool], no_v2: tuple[bool] = (False,)) -> types.ModuleType:
    """A recorded pynvml: the values one GPU returned, and NVML's error classes."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    def not_supported(h: Any) -> Any:
        raise NVMLError_NotSupported("Not Supported")

    class NVMLError_FunctionNotFound(NVMLError):
        pass

    def memory_info(h: Any, version: int | None = None) -> Any:
        # v1 counts the driver's reserved 512 MiB as used; v2 (what nvidia-smi shows) does not.
        if version is None:
            return ns(total=8 << 30, used=(2 << 30) + (512 << 20), free=(6 << 30) - (512 << 20))
        if no_v2[0]:
            raise NVMLError_FunctionNotFound("Function Not Found")
        return ns(total=8 << 30, reserved=512 << 20, used=2 << 30, free=(6 << 30) - (512 << 20))

    def count() -> int:
        if lost[0]:
            raise NVMLError("GPU is lost")
        return 1

    ns = types.SimpleNamespace
    attrs: dict[str, Any] = {
        "NVMLError": NVMLError,
        "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVMLError_NoPermission": NVMLError_NoPermission,
        "NVMLError_FunctionNotFound": NVMLError_FunctionNotFound,
        "NVML_TEMPERATURE_GPU": 0,
        "NVML_CLOCK_SM": 1,
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": count,
        "nvmlDeviceGetHandleByIndex": lambda i: f"h{i}",
        "nvmlDeviceGetName": lambda h: b"NVIDIA Recorded 24GB",
        "nvmlDeviceGetUUID": lambda h: "GPU-1234",
        "nvmlDeviceGetTemperature": lambda h, sensor: 55 if sensor == 0 else -1,
        "nvmlDeviceGetUtilizationRates": lambda h: ns(gpu=80, memory=30),
        "nvmlMemory_v2": 0x2000028,
        "nvmlDeviceGetMemoryInfo": memory_info,
        "nvmlDeviceGetPowerUsage": lambda h: 123456,
        "nvmlDeviceGetEnforcedPowerLimit": not_supported,
        "nvmlDeviceGetClockInfo": lambda h, clock: 1500 if clock == 1 else -1,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x44,
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [ns(pid=42, usedGpuMemory=1 << 30)],
    }
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def test_pynvml_provider_converts_units_and_tolerates_unsupported_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lost = [False]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(lost))
    provider = PynvmlProvider()
    provider.open()
    (r,) = provider.read()
    assert r == GpuReading(
        index=0, name="NVIDIA Recorded 24GB", uuid="GPU-1234", temperature_c=55.0, utilization_percent=80.0,
        memory_utilization_percent=30.0, memory_used_mb=2048.0, memory_total_mb=8192.0, power_w=123.456,
        power_limit_w=None, sm_clock_mhz=1500.0, throttle_reasons_mask=0x44,
        processes=({"pid": 42, "used_memory_mb": 1024.0},),
    )  # fmt: skip
    assert r.memory_percent == 25.0
    lost[0] = True
    with pytest.raises(GpuUnavailable, match="GPU is lost"):
        provider.read()


def test_memory_used_is_what_nvidia_smi_shows_and_old_drivers_fall_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """v2 memory info leaves the driver's reserved memory out of ``used`` (as nvidia-smi does); a driver
    without the v2 call is read through v1, reserved memory included."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([False]))
    provider = PynvmlProvider()
    provider.open()
    assert provider.read()[0].memory_used_mb == 2048.0
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([False], no_v2=(True,)))
    old = PynvmlProvider()
    old.open()
    assert old.read()[0].memory_used_mb == 2048.0 + 512.0


def test_throttle_names() -> None:
    assert throttle_names(None) is None
    assert throttle_names(0) == ""
    assert throttle_names(0x44) == "sw_power_cap,hw_thermal_slowdown"
    assert throttle_names(0x1 | 0x10000) == "gpu_idle,0x10000"


async def test_no_gpu_one_line_then_quiet_retries_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    missing = GpuUnavailable("NVML init failed: NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    provider = RecordedProvider([[READING]], open_errors=[missing] * 5)
    monitor = GpuMonitor(provider, backoff_initial_s=5.0, backoff_max_s=20.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="proxy.resources.nvml"):
        for _ in range(50):  # fifty samples at the same instant: one attempt, the rest wait for back-off
            assert await monitor.read() is None
        assert provider.opens == 1 and monitor.state == "unavailable"
        attempts_at: list[float] = []
        for _ in range(120):  # two minutes of 1 Hz samples
            clock.now += 1.0
            before = provider.opens
            assert await monitor.read() is None or provider.opens > 5
            if provider.opens > before:
                attempts_at.append(clock.now - 1000.0)
    # Retries at 5, 15, 35, 55, 75, ... s: the gap doubles to the 20 s cap, never a hot loop.
    assert attempts_at[:5] == [5.0, 15.0, 35.0, 55.0, 75.0]
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 2, [r.getMessage() for r in info]  # "off" once, then "on" after the 6th open
    assert "GPU sampling off" in info[0].getMessage() and "Library Not Found" in info[0].getMessage()
    assert info[0].levelno == logging.INFO  # never worked here: not a warning
    assert "GPU sampling on: 1 GPU" in info[1].getMessage()
    await monitor.close()


async def test_nvml_failing_mid_run_warns_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    lost = GpuUnavailable("NVML read failed: NVMLError_GpuIsLost: GPU is lost")
    provider = RecordedProvider([[READING], [READING], lost, lost, lost, [READING]])
    monitor = GpuMonitor(provider, backoff_initial_s=2.0, backoff_max_s=8.0, clock=clock)
    results = []
    with caplog.at_level(logging.INFO, logger="proxy.resources.nvml"):
        for _ in range(20):
            results.append(await monitor.read())
            clock.now += 1.0
    assert results[0] == [READING] and results[1] == [READING]
    assert results[2] is None and monitor.state == "ok" and results[-1] == [READING]
    # reads at t=0,1 ok; 2 fails; retry at 4 fails; retry at 8 fails; retry at 16 works, then 17..19
    assert provider.reads == 9 and provider.opens == 4 and provider.closes == 3
    messages = [r.getMessage() for r in caplog.records]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GPU is lost" in warnings[0].getMessage(), messages
    assert sum("GPU sampling on" in m for m in messages) == 2  # at start, and once recovered
    await monitor.close()


async def test_a_hung_nvml_call_is_not_waited_on_twice(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    provider = RecordedProvider([[READING]], on_read=lambda: release.wait(10))
    monitor = GpuMonitor(provider, call_timeout_s=0.05)
    with caplog.at_level(logging.WARNING, logger="proxy.resources.nvml"):
        started = time.monotonic()
        assert await monitor.read() is None  # timed out, still running on the NVML thread
        for _ in range(10):
            assert await monitor.read() is None  # returns at once: the call is still in flight
        assert time.monotonic() - started < 1.0
        assert provider.reads == 1
        release.set()
        provider._on_read = None
        for _ in range(100):
            if monitor._pending is not None and monitor._pending.done():
                break
            await asyncio.sleep(0.01)
        assert await monitor.read() == [READING]
    assert provider.reads == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["an NVML call has not returned; GPU samples skipped until it does"]
    await monitor.close()
