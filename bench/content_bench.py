"""What content analysis costs a request: ollamon with ``content.enabled`` off and on, side by side.

Starts the emulator and two ``ollamon serve`` processes in front of it (one with content analysis on:
PII, language and the lexical scores; no guard model), then sends non-streamed ``/api/chat`` requests
at a fixed rate (open loop: a request starts every 1/rate s whatever the others do), alternating the
targets every second so both share the machine's conditions. Each prompt is ~400 characters holding an
e-mail address, a card number and an IP. Prints p50/p99 client latency per target, the ollamon
process's CPU per request, and the analyzer's own CPU per analysis and its counters.

    python bench/content_bench.py [--rate 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from common import free_port, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("content off", "content on")
PROMPT = (
    "Hello, I am writing about my order. Please send the invoice to jane.doe.{i}@example.com and charge "
    "the card 4111 1111 1111 1111 as before. Our office connects from 203.0.113.{j}, so whitelist it. "
    "Could you also explain, in a few friendly sentences, how the refund policy works when a parcel is "
    "lost in transit, and what I should do next if the courier never shows up? Thank you very much!"
)


@contextlib.contextmanager
def servers(tmp: Path) -> Iterator[dict[str, tuple[str, int]]]:
    py = sys.executable
    env = {**os.environ, "OLLAMON_CONFIG": ""}
    quiet = {"cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    emu_port = free_port()
    procs = [
        subprocess.Popen(
            [
                *(py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"),
                *(
                    "--parallel",
                    "1000",
                    "--tokens",
                    "20",
                    "--token-interval-ms",
                    "1",
                    "--prompt-eval-ms",
                    "0",
                ),
            ],
            env=env,
            **quiet,  # type: ignore[arg-type]
        )
    ]
    wait_http(f"http://127.0.0.1:{emu_port}/")
    on = tmp / "content-on.yaml"
    on.write_text("content:\n  enabled: true\n")
    targets: dict[str, tuple[str, int]] = {}
    try:
        for name in TARGETS:
            port = free_port()
            p = subprocess.Popen(
                [
                    *(py, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}"),
                    *("--upstream", f"127.0.0.1:{emu_port}", "--db", str(tmp / f"{port}.db")),
                    *("--no-redis", "--log-level", "error"),
                ],
                env={**env, "OLLAMON_CONFIG": str(on) if name == "content on" else ""},
                **quiet,  # type: ignore[arg-type]
            )
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/ollamon/health")
            targets[name] = (f"http://127.0.0.1:{port}", p.pid)
        yield targets
    finally:
        stop_processes(procs)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def one(session: aiohttp.ClientSession, url: str, i: int, out: list[float], errors: list[str]) -> None:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": PROMPT.format(i=i, j=i % 250)}],
        "stream": False,
    }
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/api/chat", json=body) as resp:
            await resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                return
    except aiohttp.ClientError as exc:
        errors.append(str(exc))
        return
    out.append((time.perf_counter() - start) * 1000)


async def health(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/ollamon/health") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d, servers(Path(d)) as targets:
        procs = {n: psutil.Process(targets[n][1]) for n in TARGETS}
        lat: dict[str, list[float]] = {n: [] for n in TARGETS}
        errors: dict[str, list[str]] = {n: [] for n in TARGETS}
        cpu = dict.fromkeys(TARGETS, 0.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for name in TARGETS:  # warm up: connections, the language model's first load
                await asyncio.gather(*(one(s, targets[name][0], i, [], []) for i in range(20)))
            await asyncio.sleep(2)
            tasks: list[asyncio.Task[None]] = []
            i = 0
            for second in range(args.seconds):
                name = TARGETS[second % 2]
                url, proc = targets[name][0], procs[name]
                before = proc.cpu_times()
                t0 = time.perf_counter()
                for k in range(args.rate):
                    await asyncio.sleep(max(0.0, t0 + k / args.rate - time.perf_counter()))
                    tasks.append(asyncio.ensure_future(one(s, url, i, lat[name], errors[name])))
                    i += 1
                await asyncio.sleep(max(0.0, t0 + 1.0 - time.perf_counter()))
                after = proc.cpu_times()
                cpu[name] += (after.user + after.system) - (before.user + before.system)
            await asyncio.gather(*tasks)
            await asyncio.sleep(3)  # let the analyzer finish what is queued
            content = (await health(s, targets["content on"][0]))["content"]
        print(
            f"# non-streamed /api/chat, ~400-char prompts with PII, {args.rate} requests/s open loop, "
            f"targets alternating every second for {args.seconds} s; times in ms\n"
        )
        print("| target | requests | errors | p50 | p99 | ollamon CPU ms per request |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in TARGETS:
            n = len(lat[name])
            per = cpu[name] * 1000 / max(1, n)
            p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
            print(f"| {name} | {n} | {len(errors[name])} | {p50:.2f} | {p99:.2f} | {per:.2f} |")
        keys = (
            "offered",
            "analysed",
            "failed",
            "dropped",
            "queue_depth",
            "local_ms_mean",
            "local_cpu_ms_mean",
        )
        print("\nanalyzer: " + ", ".join(f"{k}={content.get(k)}" for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
