"""Host and process readings through psutil, with rates computed from counter deltas.

``SystemReader.read()`` is blocking (``statvfs`` on a hung network mount can stall) and stateful (it keeps
the previous counters to turn them into percentages and rates), so the sampler calls it from one thread,
one call at a time. CPU percentages are computed here from ``cpu_times`` deltas rather than with
``psutil.cpu_percent(None)``, whose hidden module-level state any other caller in the process would disturb.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from storage.records import iso_utc
from storage.resources import SystemSample

__all__ = ["SystemReader"]

_GIB = float(1 << 30)
_MIB = float(1 << 20)


def _existing(path: Path) -> Path:
    """The path itself, or its nearest existing ancestor (the volume it will live on)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _busy_total(t: Any) -> tuple[float, float]:
    """(busy, total) seconds of one ``cpu_times`` entry; idle and iowait count as not busy."""
    total = sum(t)
    # guest time is already included in user time on Linux; do not count it twice.
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


class SystemReader:
    """Reads one ``SystemSample``; call ``read()`` from a single thread."""

    def __init__(self, db_path: str | Path, extra_paths: Sequence[str] = ()) -> None:
        self.disk_path = str(_existing(Path(db_path).parent))
        self.extra_paths = [str(_existing(Path(p))) for p in extra_paths]
        self._proc = psutil.Process()
        self._cpu_count = psutil.cpu_count() or 1
        self._prev_cpu: list[tuple[float, float]] | None = None
        self._prev_proc: tuple[float, float] | None = None
        self._prev_net: tuple[float, int, int] | None = None
        self.last_read_mono: float | None = None  # monotonic time of the last read's counters
        self._cpu_delta()  # prime: the first real sample then covers one interval
        self._proc_delta(time.monotonic())

    def _cpu_delta(self) -> tuple[float | None, list[float]]:
        now = [_busy_total(t) for t in psutil.cpu_times(percpu=True)]
        prev, self._prev_cpu = self._prev_cpu, now
        if prev is None or len(prev) != len(now):
            return None, []
        per_core: list[float] = []
        busy_sum = total_sum = 0.0
        for (b0, t0), (b1, t1) in zip(prev, now, strict=True):
            db, dt = max(0.0, b1 - b0), t1 - t0
            per_core.append(round(min(100.0, 100.0 * db / dt), 1) if dt > 0 else 0.0)
            busy_sum += db
            total_sum += max(0.0, dt)
        total = min(100.0, 100.0 * busy_sum / total_sum) if total_sum > 0 else 0.0
        return total, per_core

    def _proc_delta(self, mono: float) -> float | None:
        t = self._proc.cpu_times()
        used = t.user + t.system
        prev, self._prev_proc = self._prev_proc, (mono, used)
        if prev is None or mono <= prev[0]:
            return None
        return max(0.0, 100.0 * (used - prev[1]) / (mono - prev[0]))

    def _net(self, mono: float) -> tuple[int, int, float | None, float | None]:
        """Bytes sent/received over every interface but loopback, and their rates since the last read."""
        sent = recv = 0
        for name, c in psutil.net_io_counters(pernic=True).items():
            if name == "lo" or name.startswith("lo:"):
                continue  # ollamon <-> local Ollama traffic would be counted twice
            sent += c.bytes_sent
            recv += c.bytes_recv
        prev, self._prev_net = self._prev_net, (mono, sent, recv)
        self.last_read_mono = mono
        if prev is None or mono <= prev[0] or sent < prev[1] or recv < prev[2]:
            return sent, recv, None, None  # first read, or counters reset (interface gone)
        dt = mono - prev[0]
        return sent, recv, (sent - prev[1]) / dt, (recv - prev[2]) / dt

    def read(self) -> SystemSample:
        """Read everything now (blocking; one thread)."""
        wall = time.time()
        mono = time.monotonic()
        cpu, per_core = self._cpu_delta()
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        disk = psutil.disk_usage(self.disk_path)
        sent, recv, sent_rate, recv_rate = self._net(mono)
        load = os.getloadavg()
        extra: dict[str, Any] = {"cpu_per_core": per_core}
        if self.extra_paths:
            disks: dict[str, dict[str, float]] = {}
            for path in self.extra_paths:
                try:
                    d = psutil.disk_usage(path)
                except OSError:
                    continue  # a mount that vanished: skip it this time
                disks[path] = {"percent": d.percent, "free_gb": d.free / _GIB, "total_gb": d.total / _GIB}
            extra["disks"] = disks
        return SystemSample(
            timestamp=iso_utc(wall),
            cpu_percent=None if cpu is None else round(cpu, 2),
            memory_percent=vm.percent,
            memory_used_gb=(vm.total - vm.available) / _GIB,
            memory_total_gb=vm.total / _GIB,
            swap_percent=sw.percent,
            swap_used_gb=sw.used / _GIB,
            disk_percent=disk.percent,
            disk_free_gb=disk.free / _GIB,
            disk_total_gb=disk.total / _GIB,
            disk_path=self.disk_path,
            net_sent_bytes=sent,
            net_recv_bytes=recv,
            net_sent_bytes_per_s=sent_rate,
            net_recv_bytes_per_s=recv_rate,
            load_1m=load[0],
            load_5m=load[1],
            load_15m=load[2],
            process_rss_mb=self._proc.memory_info().rss / _MIB,
            process_cpu_percent=self._proc_delta(mono),
            cpu_count=self._cpu_count,
            extra=extra,
        )
