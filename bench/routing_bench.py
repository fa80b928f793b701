"""Micro-benchmark of routing: what ``HostPool.acquire(model)`` + ``release`` add to one request.

Run: ``python bench/routing_bench.py`` (``--calls N --rounds R``). Not a test; it prints a markdown table.
Each host has 40 models installed and 2 loaded, a third of the hosts restrict ``models`` by glob, and the
requests cycle over 60 model spellings (``Llama3.2``, ``qwen3:0.6b``, unknown names), so every tier of the
rule is exercised. No I/O: the health checks are not running (their results are set directly), exactly
what the request path sees between two rounds. Target (issue 16): routing adds < 0.2 ms p50.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.upstream_url import Upstream
from proxy.upstreams import HostPool, HostSpec, Outcome, PoolSettings

INSTALLED = [f"model{i}:latest" for i in range(40)]
SPELLINGS = [f"Model{i}" for i in range(40)] + [f"unknown{i}:7b" for i in range(20)]


def make_pool(n: int) -> HostPool:
    specs = tuple(
        HostSpec(
            f"gpu-{i}",
            Upstream.parse(f"http://10.0.0.{i + 1}:11434"),
            weight=1 + i % 3,
            models=("model1*", "model2*", "unknown*") if i % 3 == 2 else (),
        )
        for i in range(n)
    )
    pool = HostPool(PoolSettings(hosts=specs), session=None)  # type: ignore[arg-type]  # no I/O in routing
    for i, host in enumerate(pool.hosts):
        host.up = True
        host.installed = frozenset(INSTALLED)
        host.loaded = frozenset(INSTALLED[(2 * i) % 40 : (2 * i) % 40 + 2])
    return pool


def per_call_us(pool: HostPool, calls: int) -> float:
    """Mean microseconds per acquire+release over ``calls`` calls."""
    names = SPELLINGS
    k = len(names)
    start = time.perf_counter()
    for i in range(calls):
        host = pool.acquire(names[i % k])
        pool.release(host, Outcome.OK)
    return (time.perf_counter() - start) / calls * 1e6


def baseline_us(pool: HostPool, calls: int) -> float:
    """The same loop with today's routing: one fixed upstream, nothing chosen (the side-by-side baseline)."""
    fixed = pool.hosts[0]
    names = SPELLINGS
    k = len(names)
    start = time.perf_counter()
    for i in range(calls):
        _ = names[i % k]
        host = fixed
        host.outstanding += 1
        host.outstanding -= 1
    return (time.perf_counter() - start) / calls * 1e6


def single_calls_us(pool: HostPool, calls: int) -> list[float]:
    """Each acquire+release timed alone (includes ~0.1 µs of perf_counter_ns itself)."""
    out = []
    names = SPELLINGS
    k = len(names)
    held = [pool.acquire(names[j % k]) for j in range(len(pool.hosts))]  # some requests in flight
    for i in range(calls):
        t0 = time.perf_counter_ns()
        host = pool.acquire(names[i % k])
        pool.release(host, Outcome.OK)
        out.append((time.perf_counter_ns() - t0) / 1000)
    for h in held:
        pool.release(h, Outcome.NEUTRAL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 3, 8, 32])
    args = parser.parse_args()
    print(f"python bench/routing_bench.py --calls {args.calls} --rounds {args.rounds}")
    print()
    print(
        "| hosts | fixed upstream µs/call | routing µs/call (median of rounds) | added µs | "
        "single call p50 µs | p99 µs |"
    )
    print("|---|---|---|---|---|---|")
    for n in args.hosts:
        pool = make_pool(n)
        per_call_us(pool, 2000)  # warm the glob cache and the interpreter
        rounds, base, singles = [], [], []
        for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
            base.append(baseline_us(pool, args.calls))
            rounds.append(per_call_us(pool, args.calls))
            singles.extend(single_calls_us(pool, args.calls // 10))
        singles.sort()
        p50 = singles[len(singles) // 2]
        p99 = singles[int(len(singles) * 0.99)]
        b, r = statistics.median(base), statistics.median(rounds)
        print(f"| {n} | {b:.2f} | {r:.2f} | {r - b:.2f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
