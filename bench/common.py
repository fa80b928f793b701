"""What the bench scripts share: free ports, waiting for a server, stopping processes, one timed request.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path`` and they ``import common``.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["free_port", "interleaved_latency", "stop_processes", "timed_generate", "wait_http"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Return once ``url`` answers at all (any status); RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], wait_s: float = 15.0) -> None:
    """SIGTERM each (last started first), then wait; kill what has not stopped within ``wait_s``."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()


async def timed_generate(session: aiohttp.ClientSession, url: str, out: list[float]) -> None:
    """One streamed /api/generate through ``url``, read to the end; its wall time in ms appended to ``out``."""
    start = time.perf_counter()
    async with session.post(f"{url}/api/generate", json={"model": "llama3.2", "prompt": "bench"}) as resp:
        async for _ in resp.content.iter_any():
            pass
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
    out.append((time.perf_counter() - start) * 1000)


async def interleaved_latency(
    session: aiohttp.ClientSession,
    targets: dict[str, str],
    procs: dict[str, Any],
    concurrency: int,
    rounds: int,
    requests: int,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Timed /api/generate streams against each target in turn, ``rounds`` times (targets interleaved so
    that machine noise hits them alike): latencies in ms and the CPU seconds each target's process used."""
    lat: dict[str, list[float]] = {n: [] for n in targets}
    cpu = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, url in targets.items():
            before = procs[name].cpu_times()
            for _ in range(max(1, requests // concurrency)):
                await asyncio.gather(*(timed_generate(session, url, lat[name]) for _ in range(concurrency)))
            after = procs[name].cpu_times()
            cpu[name] += (after.user + after.system) - (before.user + before.system)
    return lat, cpu


def count_rows(db: Path, table: str = "inference_metrics") -> int:
    """Rows in ``table`` of ollamon's database now (0 while the file or the table does not exist yet)."""
    try:
        con = sqlite3.connect(db)
        try:
            return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0
