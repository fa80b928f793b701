"""CPU cost of the resource sampler at 1 Hz: process CPU time over a window with and without it.

Both phases run in one process on one event loop with the same writer and SQLite store, so the only
difference is the sampler (psutil on its thread, NVML on its thread when a driver is present, the energy
meter, listeners, one SQLite row per ``--store-every`` seconds). The figure is CPU seconds used per wall
second, as a percentage of one core. Run: ``python bench/sampler_bench.py --seconds 60``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.resources.energy import EnergyMeter
from proxy.resources.nvml import GpuMonitor, PynvmlProvider
from proxy.resources.sampler import Sampler
from proxy.resources.system_stats import SystemReader
from storage.resources import register_resources
from storage.sqlite import SQLiteStore
from storage.writer import Writer


async def _window(seconds: float) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    return time.process_time() - cpu0, time.monotonic() - wall0


async def main(seconds: float, interval: float, store_every: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "bench.db")
        await store.open()
        register_resources(store)
        writer = Writer(store)
        await writer.start()
        await asyncio.sleep(1.0)  # let startup work settle
        base_cpu, base_wall = await _window(seconds)

        gpu = GpuMonitor(PynvmlProvider())
        meter = EnergyMeter()
        reader = await asyncio.to_thread(SystemReader, store.path)
        sampler = Sampler(
            reader, interval_s=interval, store_every_s=store_every, gpu=gpu, writer=writer, meter=meter
        )
        flats: list[int] = []
        sampler.add_listener(lambda flat: flats.append(len(flat)))
        await sampler.start()
        await asyncio.sleep(1.0)
        on_cpu, on_wall = await _window(seconds)
        samples = sampler.samples
        await sampler.stop()
        await writer.stop()
        await store.close()

    base_pct = 100.0 * base_cpu / base_wall
    on_pct = 100.0 * on_cpu / on_wall
    extra_pct = on_pct - base_pct
    per_sample_ms = 1000.0 * (on_cpu - base_cpu * on_wall / base_wall) / max(1, samples)
    print(f"sampler bench: {seconds:g} s windows, interval {interval:g} s, store every {store_every:g} s")
    print(f"GPU: {gpu.status()['state']} ({gpu.status()['reason'] or str(gpu.status()['gpus']) + ' GPU(s)'})")
    print()
    print(f"| {'phase':<16} | {'wall s':>7} | {'cpu s':>7} | {'% of one core':>13} | {'samples':>7} |")
    print(f"|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 15}|{'-' * 9}|")
    print(f"| {'without sampler':<16} | {base_wall:7.2f} | {base_cpu:7.3f} | {base_pct:13.3f} | {0:>7} |")
    print(f"| {'with sampler':<16} | {on_wall:7.2f} | {on_cpu:7.3f} | {on_pct:13.3f} | {samples:>7} |")
    print()
    print(f"sampler cost: {extra_pct:.3f}% of one core ({per_sample_ms:.2f} ms CPU per sample)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each window (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval in seconds (default 1)")
    p.add_argument("--store-every", type=float, default=10.0, help="seconds between stored rows (default 10)")
    a = p.parse_args()
    asyncio.run(main(a.seconds, a.interval, a.store_every))
