"""How close is the TTFT ollamon records to the TTFT its client sees? Per streamed route, against one server.

Starts the emulator and ``ollamon serve`` as processes (the client here shares no event loop with them),
sends ``--requests`` streamed requests per route one after another, and notes for each when the client's
request began and when the first content delta reached it (read at the HTTP level: the first NDJSON line or
SSE ``data:`` event that carries text). It then stops ollamon (which drains its writer) and compares with the
``ttft_ms`` stored for the same ``X-Request-Id``: ``client - recorded`` is what ollamon's TTFT misses (the
client sending its request, and the last hop back), never negative if the clocks agree. Prints a Markdown
table of medians, p95 and maximum, in ms.

    python bench/ttft_fidelity.py [--requests 40] [--interval-ms 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from common import free_port, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent
MSG = [{"role": "user", "content": "why is the sky blue?"}]


def _chat(o: Any) -> bool:
    m = o.get("message") or {}
    return bool(m.get("content") or m.get("thinking"))


def _openai(o: Any) -> bool:
    choices = o.get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


ROUTES: dict[str, tuple[dict[str, Any], Callable[[Any], bool]]] = {
    "/api/chat": ({"model": "llama3.2", "messages": MSG}, _chat),
    "/v1/chat/completions": ({"model": "llama3.2", "messages": MSG, "stream": True}, _openai),
    "/v1/messages": (
        {"model": "llama3.2", "messages": MSG, "max_tokens": 64, "stream": True},
        lambda o: o.get("type") == "content_block_delta",
    ),
    "/v1/responses": (
        {"model": "llama3.2", "input": "why is the sky blue?", "stream": True},
        lambda o: o.get("type") == "response.output_text.delta",
    ),
}


async def one(s: aiohttp.ClientSession, url: str, route: str, rid: str, interval_ms: float) -> float:
    body, is_content = ROUTES[route]
    headers = {"X-Request-Id": rid, "X-Emulate": f"interval_ms={interval_ms}; tokens=8"}
    start = time.perf_counter()
    first: float | None = None
    async with s.post(url + route, json=body, headers=headers) as r:
        async for line in r.content:
            if first is not None:
                continue
            text = line.strip()
            if text.startswith(b"data:"):
                text = text[5:].strip()
            if not text.startswith(b"{"):
                continue
            if is_content(orjson.loads(text)):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{route}: no content delta seen")
    return (first - start) * 1000.0


async def drive(url: str, n: int, interval_ms: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    async with aiohttp.ClientSession() as s:
        for route in ROUTES:
            for i in range(3):  # warm the connection and the model
                await one(s, url, route, f"warm-{route}-{i}", interval_ms)
            for i in range(n):
                rid = f"fid-{route}-{i}"
                seen[rid] = await one(s, url, route, rid, interval_ms)
    return seen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="requests per route (default 40)")
    p.add_argument("--interval-ms", type=float, default=15.0, help="emulator token pacing (default 15)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ollamon-fidelity-"))
    db = tmp / "ollamon.db"
    emu_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet: dict[str, Any] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "cwd": ROOT,
        "env": env,
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}"], **quiet
            )
        )
        wait_http(f"http://127.0.0.1:{emu_port}/")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{proxy_port}",
                 "--upstream", f"http://127.0.0.1:{emu_port}", "--db", str(db), "--no-redis"],
                **quiet,
            )
        )  # fmt: skip
        url = f"http://127.0.0.1:{proxy_port}"
        wait_http(url + "/ollamon/health")
        seen = asyncio.run(drive(url, args.requests, args.interval_ms))
    finally:
        stop_processes(procs)
    con = sqlite3.connect(db)
    recorded = dict(
        con.execute("SELECT request_id, ttft_ms FROM inference_metrics WHERE request_id LIKE 'fid-%'")
    )
    con.close()
    print(f"client-seen minus recorded TTFT, ms ({args.requests} sequential requests per route, "
          f"tokens {args.interval_ms:g} ms apart)\n")  # fmt: skip
    print("| route | n | median | p95 | max | client TTFT median |")
    print("|---|---|---|---|---|---|")
    for route in ROUTES:
        rows = [(seen[k], recorded[k]) for k in seen if k.startswith(f"fid-{route}-") and recorded.get(k)]
        diffs = sorted(c - r for c, r in rows)
        if not diffs:
            print(f"| `{route}` | 0 | | | | |")
            continue
        p95 = diffs[min(len(diffs) - 1, round(0.95 * len(diffs)) - 1)]
        client = statistics.median(c for c, _ in rows)
        print(
            f"| `{route}` | {len(diffs)} | {statistics.median(diffs):.2f} | {p95:.2f} | {diffs[-1]:.2f} | {client:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
