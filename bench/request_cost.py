"""CPU per request and per chunk, ollamon beside nginx: what a burst of simultaneous requests waits for.

Starts the targets of bench/proxy_bench.py (the emulator with unpaced tokens, ``ollamon serve``, nginx when
installed) twice: answers of 1 token, then of ``--tokens`` tokens. Each time, ``--requests`` streamed
``/api/generate`` calls go through each target one after another (nothing overlaps, so every CPU second is
that request's), targets interleaved in ``--rounds`` rounds. Each process's CPU (user + system, psutil) per
request gives, by difference of the two answer lengths:

* **per request**: the fixed cost (client-side HTTP, the handler, the upstream exchange, the response head,
  the record), i.e. the 1-token cost less one chunk;
* **per chunk**: (CPU at ``--tokens`` - CPU at 1 token) / (``--tokens`` - 1).

For ollamon the same figures of its event-loop thread alone follow: the rest (building the record, SQLite)
runs on worker threads, after the answer, but shares the GIL.

Why: when 16 streams start at once, the proxy sets them up one after another on one event loop, so the
median stream waits for about 8 setups before its first byte; its added TTFT p50 is about 8 x the
per-request cost (docs/benchmarks.md, "Where the 16-stream TTFT goes").

    python bench/request_cost.py [--requests 300] [--tokens 100] [--rounds 3] [--tree ../other-checkout]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from proxy_bench import Cpu, Samples, one_stream
from proxy_targets import servers


def loop_thread_seconds(pid: int) -> float:
    """CPU seconds of a process's main thread (ollamon's event loop: what a burst of requests queues on)."""
    for t in psutil.Process(pid).threads():
        if t.id == pid:
            return float(t.user_time + t.system_time)
    return float("nan")


async def sequential(url: str, n: int) -> float:
    """``n`` streams one after another; returns the wall seconds."""
    out = Samples()
    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            await one_stream(session, url, out)
    if out.errors:
        raise SystemExit(f"{url}: {out.errors} of {n} requests failed")
    return time.perf_counter() - start


async def cost_per_request(tokens: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per target, the CPU ms per request in each round, for answers of ``tokens`` tokens."""
    ns = argparse.Namespace(
        upstream=None, tokens=tokens, interval_ms=0, tree=args.tree, no_nginx=False, model="llama3.2"
    )
    with tempfile.TemporaryDirectory() as d, servers(ns, Path(d)) as targets:
        others = [n for n in targets if n.startswith("ollamon@") and not n.endswith("_pid")]
        names = [n for n in ("ollamon", *others, "nginx") if n in targets]
        cpu = {n: Cpu(int(targets[f"{n}_pid"])) for n in names}
        for n in names:  # warm: connections, the tokenizer, first-request paths
            await sequential(str(targets[n]), 20)
        loops = [n for n in names if n.startswith("ollamon")]
        out: dict[str, list[float]] = {n: [] for n in names}
        out.update({f"{n}, event-loop thread": [] for n in loops})
        for _ in range(args.rounds):
            for n in names:
                before = cpu[n].seconds()
                loop0 = loop_thread_seconds(int(targets[f"{n}_pid"]))
                await sequential(str(targets[n]), args.requests)
                out[n].append((cpu[n].seconds() - before) * 1000 / args.requests)
                if n in loops:
                    loop = loop_thread_seconds(int(targets[f"{n}_pid"])) - loop0
                    out[f"{n}, event-loop thread"].append(loop * 1000 / args.requests)
        return out


async def main(args: argparse.Namespace) -> None:
    one = await cost_per_request(1, args)
    many = await cost_per_request(args.tokens, args)
    print(
        f"# python bench/request_cost.py --requests {args.requests} --tokens {args.tokens} "
        f"--rounds {args.rounds}{''.join(f' --tree {t}' for t in args.tree)}  (medians of rounds; CPU of the target's processes, user + system)\n"
    )
    print(
        f"| target | CPU ms, 1-token answer | CPU ms, {args.tokens}-token answer | per chunk, µs "
        "| per request (fixed), µs | x 8 (median wait of a 16-stream burst), ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for n in one:
        if not one[n]:
            continue
        a, b = statistics.median(one[n]), statistics.median(many[n])
        chunk_ms = (b - a) / (args.tokens - 1)
        fixed_ms = a - chunk_ms
        print(
            f"| {n} | {a:.3f} | {b:.3f} | {chunk_ms * 1000:.1f} | {fixed_ms * 1000:.0f} | {8 * fixed_ms:.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tree", action="append", default=[], help="another checkout's ollamon beside this one"
    )
    a = parser.parse_args()
    if a.tokens < 2:
        parser.error("--tokens must be at least 2")
    asyncio.run(main(a))
