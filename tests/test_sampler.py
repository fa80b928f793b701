"""The sampler for real: psutil values in range, rates from counter deltas, a drift-free schedule, and
the split between the 1 Hz live view and the slower SQLite rows. Only the GPU edge is recorded."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from proxy.resources.nvml import GpuMonitor, GpuReading
from proxy.resources.sampler import Sampler, flat_view
from proxy.resources.system_stats import SystemReader
from storage.resources import SystemSample, register_resources
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.fixtures.gpu import RecordedProvider
from tests.polling import until

GPU0 = GpuReading(index=0, name="Recorded A", uuid="GPU-a", temperature_c=61.0, utilization_percent=90.0,
                  memory_utilization_percent=40.0, memory_used_mb=6000.0, memory_total_mb=24000.0,
                  power_w=250.0, power_limit_w=300.0, sm_clock_mhz=1800.0, throttle_reasons_mask=0x4,
                  processes=({"pid": 1, "used_memory_mb": 5800.0},))  # fmt: skip
GPU1 = GpuReading(index=1, name="Recorded B", uuid="GPU-b", temperature_c=70.0, utilization_percent=10.0,
                  memory_used_mb=12000.0, memory_total_mb=16000.0, power_w=50.0)  # fmt: skip


def test_system_reader_values_are_in_range(tmp_path: Path) -> None:
    reader = SystemReader(tmp_path / "x" / "ollamon.db", extra_paths=[str(tmp_path)])
    time.sleep(0.05)
    s = reader.read()
    assert s.disk_path == str(tmp_path)  # the db's directory does not exist yet: its volume is sampled
    assert s.cpu_percent is not None and 0.0 <= s.cpu_percent <= 100.0
    per_core = s.extra["cpu_per_core"] if s.extra else []
    assert len(per_core) == s.cpu_count and all(0.0 <= c <= 100.0 for c in per_core)
    assert s.memory_percent is not None and 0.0 < s.memory_percent <= 100.0
    assert s.memory_total_gb is not None and s.memory_used_gb is not None
    assert 0.0 < s.memory_used_gb < s.memory_total_gb
    assert s.swap_percent is not None and 0.0 <= s.swap_percent <= 100.0
    assert s.disk_percent is not None and 0.0 <= s.disk_percent <= 100.0
    assert (
        s.disk_free_gb is not None and s.disk_total_gb is not None and 0 <= s.disk_free_gb <= s.disk_total_gb
    )
    assert s.extra is not None and s.extra["disks"][str(tmp_path)]["total_gb"] == pytest.approx(
        s.disk_total_gb
    )
    assert s.load_1m is not None and s.load_1m >= 0.0 and s.load_15m is not None and s.load_15m >= 0.0
    assert s.process_rss_mb is not None and 10.0 < s.process_rss_mb < 100_000.0
    assert s.timestamp.endswith("Z") and len(s.timestamp) == 24


def test_process_cpu_percent_is_a_rate_from_deltas(tmp_path: Path) -> None:
    """Burn CPU between two reads: the rate must match the process CPU time measured independently."""
    reader = SystemReader(tmp_path / "ollamon.db")
    reader.read()
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < 0.3:
        sum(i * i for i in range(1000))
    s = reader.read()
    expected = 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
    assert s.process_cpu_percent is not None
    assert expected > 10.0  # the burn really used CPU (less than a core when the machine is busy)
    assert s.process_cpu_percent == pytest.approx(expected, rel=0.2, abs=5.0)


def test_network_rates_are_counter_deltas_and_exclude_loopback(tmp_path: Path) -> None:
    reader = SystemReader(tmp_path / "ollamon.db")
    first = reader.read()
    assert first.net_sent_bytes_per_s is None and first.net_recv_bytes_per_s is None  # no delta yet
    t0 = reader.last_read_mono
    payload = b"x" * (4 << 20)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    thread = threading.Thread(target=sink)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(payload)
    thread.join()
    server.close()
    second = reader.read()
    t1 = reader.last_read_mono
    assert t0 is not None and t1 is not None and t1 > t0
    assert first.net_sent_bytes is not None and second.net_sent_bytes is not None
    assert first.net_recv_bytes is not None and second.net_recv_bytes is not None
    sent, recv = second.net_sent_bytes - first.net_sent_bytes, second.net_recv_bytes - first.net_recv_bytes
    assert second.net_sent_bytes_per_s == pytest.approx(sent / (t1 - t0))
    assert second.net_recv_bytes_per_s == pytest.approx(recv / (t1 - t0))
    assert sent < len(payload) and recv < len(payload)  # the 4 MiB over loopback are not counted


async def test_schedule_does_not_drift_over_60_samples(tmp_path: Path) -> None:
    interval = 0.02
    sampler = Sampler(SystemReader(tmp_path / "ollamon.db"), interval_s=interval, store_every_s=1.0)
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, float]] = []
    done = asyncio.Event()

    def listener(flat: dict[str, float]) -> None:
        seen.append((sampler.tick, loop.time()))
        if len(seen) >= 60:
            done.set()

    sampler.add_listener(listener)
    await sampler.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sampler.stop()
    (tick0, t0), (tick59, t59) = seen[0], seen[59]
    # Whatever each sample cost, sample k is still taken about k intervals after sample 0.
    drift = (t59 - t0) - (tick59 - tick0) * interval
    assert abs(drift) < interval, (drift, seen[:3], seen[-3:])
    lateness = sorted(t - sampler.scheduled_time(tick) for tick, t in seen[:60])
    assert lateness[0] >= 0.0 and lateness[len(lateness) // 2] < interval
    assert sampler.samples >= 60 and sampler.failures == 0


async def test_every_sample_in_memory_one_in_n_stored(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "ollamon.db")
    await store.open()
    register_resources(store)
    writer = Writer(store, flush_interval_s=0.02)
    await writer.start()
    gpu = GpuMonitor(RecordedProvider([[GPU0, GPU1]]), call_timeout_s=1.0)
    sampler = Sampler(SystemReader(store.path), interval_s=0.02, store_every_s=0.1, gpu=gpu, writer=writer)
    flats: list[dict[str, float]] = []
    sampler.add_listener(flats.append)
    await sampler.start()
    await until(lambda: sampler.samples >= 30)
    await sampler.stop()
    await writer.stop()
    await store.close()
    con = sqlite3.connect(store.path)
    system_rows = con.execute("SELECT timestamp, cpu_percent, gpu_count FROM system_metrics").fetchall()
    gpu_rows = con.execute(
        "SELECT timestamp, gpu_index, name, power_w, memory_percent, throttle_reasons, processes "
        "FROM gpu_metrics ORDER BY id"
    ).fetchall()
    con.close()
    assert len(sampler.history(60)) == sampler.samples == len(flats)  # the live view keeps every one
    assert len(system_rows) == sampler.stored
    # One row per 0.1 s of ticks (5 ticks), whichever ticks were skipped under load.
    assert sampler.samples / 5 - 2 <= len(system_rows) <= sampler.tick / 5 + 2
    assert {r[2] for r in system_rows} == {2}
    assert len(gpu_rows) == 2 * len(system_rows)
    assert {r[0] for r in gpu_rows} == {r[0] for r in system_rows}
    assert gpu_rows[0][1:] == (
        0,
        "Recorded A",
        250.0,
        25.0,
        "sw_power_cap",
        '[{"pid":1,"used_memory_mb":5800.0}]',
    )
    flat = flats[-1]
    assert flat["gpu_temperature_c"] == 70.0 and flat["gpu_utilization_percent"] == 90.0
    assert flat["gpu_memory_percent"] == 75.0 and flat["gpu_power_w"] == 300.0 and flat["gpu_count"] == 2.0
    assert 0.0 <= flat["cpu_percent"] <= 100.0 and 0.0 < flat["memory_percent"] <= 100.0
    assert 0.0 <= flat["disk_percent"] <= 100.0


async def test_without_gpu_the_flat_view_has_no_gpu_keys(tmp_path: Path) -> None:
    gpu = GpuMonitor(RecordedProvider([], open_errors=[RuntimeError("unused")]), call_timeout_s=1.0)
    sampler = Sampler(SystemReader(tmp_path / "ollamon.db"), interval_s=0.02, gpu=gpu)
    await sampler.start()
    await until(lambda: sampler.samples >= 3)
    await sampler.stop()
    snap = sampler.latest
    assert snap is not None and snap.gpus is None and snap.system.gpu_count is None
    flat = flat_view(snap)
    assert not [k for k in flat if k.startswith("gpu_")]
    assert {"cpu_percent", "memory_percent", "disk_percent", "process_rss_mb"} <= set(flat)


class _StuckReader(SystemReader):
    """A real reader whose second read hangs, like statvfs on a dead network mount."""

    def __init__(self, path: Path, release: threading.Event) -> None:
        super().__init__(path)
        self.release = release
        self.calls = 0

    def read(self) -> SystemSample:
        self.calls += 1
        if self.calls == 2:
            self.release.wait(10)
        return super().read()


async def test_a_hung_psutil_call_skips_samples_but_not_the_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    reader = _StuckReader(tmp_path / "ollamon.db", release)
    sampler = Sampler(reader, interval_s=0.02)
    ticks: list[int] = []
    sampler.add_listener(lambda flat: ticks.append(sampler.tick))
    with caplog.at_level(logging.WARNING, logger="proxy.resources.sampler"):
        await sampler.start()
        await until(lambda: sampler.tick >= 40)  # meanwhile the second read hangs, and stays hung
        assert reader.calls == 2 and sampler.samples == 1 and sampler.tick >= 40
        release.set()
        await until(lambda: sampler.samples >= 4)
        await sampler.stop()
    warnings = [r for r in caplog.records if r.name == "proxy.resources.sampler"]
    assert len(warnings) == 1 and "has not returned" in warnings[0].getMessage()
