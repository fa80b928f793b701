"""The dashboard's live stream: CPU of the proxy process with 0, 1, 10 and 50 open streams at 1 update/s,
and its memory while one page stops reading.

Starts ``python -m proxy emulate`` and ``python -m proxy serve`` as subprocesses (the real entry points),
sends light background traffic (2 requests/s, so frames carry new rows), opens N streams that read every
frame, and measures the proxy process with psutil: CPU time over the phase divided by wall time (% of one
core), and RSS. Then a raw socket with a small receive buffer opens a stream and never reads for
``--stall`` seconds while 10 other pages keep reading; the proxy's RSS before and after, and the frames the
stalled page skipped (``/ollamon/health`` ``dashboard``), show that nothing piles up.

    python bench/sse_bench.py [--seconds 15] [--stall 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def servers(tmp: Path, interval_s: float) -> AsyncIterator[tuple[str, psutil.Process]]:
    emu_port, proxy_port = free_port(), free_port()
    config = tmp / "config.yaml"
    config.write_text(
        f"server:\n  listen: 127.0.0.1:{proxy_port}\n  upstream: http://127.0.0.1:{emu_port}\n"
        f"storage:\n  db: {tmp / 'bench.db'}\n"
        f"dashboard:\n  live_interval_s: {interval_s}\n  max_live_clients: 200\n"
        "inventory:\n  enabled: false\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    emu = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--tokens", "20"],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    serve = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        "--no-redis",
        "--log-level",
        "warning",
    ]
    proxy = await asyncio.create_subprocess_exec(*serve, env=env, cwd=tmp)
    try:
        await wait_http(f"http://127.0.0.1:{emu_port}/")
        await wait_http(f"http://127.0.0.1:{proxy_port}/ollamon/health")
        yield f"http://127.0.0.1:{proxy_port}", psutil.Process(proxy.pid)
    finally:
        for p in (proxy, emu):
            p.terminate()
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()


async def traffic(base: str, stop: asyncio.Event, per_s: float = 2.0) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.post(
                f"{base}/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}
            ) as r:
                await r.read()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / per_s)


async def reader(session: aiohttp.ClientSession, base: str, counts: list[int], i: int) -> None:
    async with session.get(f"{base}/ollamon/api/live") as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_any():
            counts[i] += chunk.count(b"\n\ndata: ") + chunk.startswith(b"data: ")


async def measure(proc: psutil.Process, base: str, streams: int, seconds: float) -> dict[str, float]:
    counts = [0] * streams
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.ensure_future(reader(s, base, counts, i)) for i in range(streams)]
        await asyncio.sleep(2.0)  # connected and settled
        before, t0, frames0 = proc.cpu_times(), time.monotonic(), sum(counts)
        await asyncio.sleep(seconds)
        after, t1, frames1 = proc.cpu_times(), time.monotonic(), sum(counts)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cpu = (after.user + after.system - before.user - before.system) / (t1 - t0) * 100
    return {
        "cpu": cpu,
        "rss_mb": proc.memory_info().rss / 2**20,
        "frames_per_stream_s": (frames1 - frames0) / max(1, streams) / (t1 - t0),
    }


async def health(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/ollamon/health") as r:
        body: dict[str, Any] = (await r.json())["dashboard"]
        return body


async def stall(proc: psutil.Process, base: str, seconds: float) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    counts = [0] * 10
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.ensure_future(reader(s, base, counts, i)) for i in range(10)]
        await asyncio.sleep(2.0)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(f"GET /ollamon/api/live HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await asyncio.sleep(1.0)
        rss0, frames0 = proc.memory_info().rss, sum(counts)
        await asyncio.sleep(seconds)  # the raw socket is never read
        rss1, frames1 = proc.memory_info().rss, sum(counts)
        h = await health(base)
        sock.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"rss0": rss0 / 2**20, "rss1": rss1 / 2**20, "readers_frames": frames1 - frames0, **h}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--stall", type=float, default=20.0)
    ap.add_argument("--stall-interval", type=float, default=0.005, help="live_interval_s for the stall phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        async with servers(Path(d), 1.0) as (base, proc):
            stop = asyncio.Event()
            load = asyncio.ensure_future(traffic(base, stop))
            rows = []
            for n in (0, 1, 10, 50):
                rows.append((n, await measure(proc, base, n, args.seconds)))
            stop.set()
            await load
        print(
            f"live stream fan-out, 1 update/s, {args.seconds:g} s per row, 2 requests/s of background traffic"
        )
        print(
            f"{'streams':>7}  {'proxy CPU % of one core':>24}  {'over 0 streams':>14}  {'frames/s per stream':>19}  {'RSS MiB':>8}"
        )
        base_cpu = rows[0][1]["cpu"]
        for n, r in rows:
            print(
                f"{n:>7}  {r['cpu']:>24.2f}  {r['cpu'] - base_cpu:>14.2f}  {r['frames_per_stream_s']:>19.2f}  {r['rss_mb']:>8.1f}"
            )
    with tempfile.TemporaryDirectory() as d:
        async with servers(Path(d), args.stall_interval) as (base, proc):
            s = await stall(proc, base, args.stall)
        print()
        print(
            f"one page stops reading for {args.stall:g} s (frames every {args.stall_interval:g} s) "
            "while 10 pages read:"
        )
        print(f"  proxy RSS {s['rss0']:.1f} MiB -> {s['rss1']:.1f} MiB ({s['rss1'] - s['rss0']:+.1f} MiB)")
        print(
            f"  frames skipped for the stalled page: {s['frames_skipped']}; frame size {s['frame_bytes']} bytes"
        )
        print(f"  frames the 10 reading pages got meanwhile: {s['readers_frames']}")


if __name__ == "__main__":
    asyncio.run(main())
