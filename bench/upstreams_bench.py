"""What routing among several Ollama hosts adds to a request, end to end through ``ollamon serve``.

Starts three emulators (loaded, short paced streams) and two ollamon processes: one with ``--upstream`` the
first emulator (the single-upstream path), one with ``upstreams.hosts`` all three (the routed path:
HostPool.acquire/release, send_with_retry, per-host connection pools). Targets are timed interleaved, in
rounds, so machine noise hits them alike: ``direct`` (the first emulator), ``ollamon-1`` and ``ollamon-3``.
Prints the median latency per target and concurrency, what each ollamon adds over direct (median of rounds),
what the routed path adds over the single one, and CPU ms per request. Target (issue 16): routing adds
< 0.2 ms p50.

    python bench/upstreams_bench.py [--concurrency 1,16] [--rounds 5] [--requests 64] [--tokens 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import psutil
from common import free_port, interleaved_latency, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent


def start(
    tmp: Path, args: argparse.Namespace
) -> tuple[list[subprocess.Popen[bytes]], dict[str, str], dict[str, int]]:
    env = {**os.environ, "OLLAMON_CONFIG": ""}
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    emus: list[str] = []
    for _ in range(3):
        port = free_port()
        cmd = [
            py,
            "-m",
            "proxy",
            "emulate",
            "--listen",
            f"127.0.0.1:{port}",
            "--start-loaded",
            "--parallel",
            "1000",
        ]
        cmd += [
            "--tokens",
            str(args.tokens),
            "--token-interval-ms",
            str(args.interval_ms),
            "--prompt-eval-ms",
            "0",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        emus.append(f"http://127.0.0.1:{port}")
    for url in emus:
        wait_http(f"{url}/")
    config = tmp / "three.yaml"
    config.write_text(
        "upstreams:\n  hosts:\n" + "".join(f"    - {{url: {u}, name: h{i}}}\n" for i, u in enumerate(emus))
    )
    urls = {"direct": emus[0]}
    pids = {"direct": procs[0].pid}
    for name, extra in (("ollamon-1", []), ("ollamon-3", ["--config", str(config)])):
        port = free_port()
        cmd = [py, "-m", "proxy", "serve", *extra, "--listen", f"127.0.0.1:{port}", "--upstream", emus[0]]
        cmd += ["--db", str(tmp / f"{name}.db"), "--no-redis", "--log-level", "warning"]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        urls[name] = f"http://127.0.0.1:{port}"
        pids[name] = procs[-1].pid
        wait_http(f"{urls[name]}/ollamon/health")
    return procs, urls, pids


async def run(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int]) -> None:
    handles = {n: psutil.Process(p) for n, p in pids.items()}
    print(
        f"# python bench/upstreams_bench.py --concurrency {','.join(map(str, args.concurrency))} "
        f"--rounds {args.rounds} --requests {args.requests} --tokens {args.tokens}"
    )
    print(
        f"# {args.tokens}-token streams, {args.interval_ms} ms between tokens; targets interleaved per round"
    )
    print()
    print("| conc | target | total p50 ms | added p50 ms (median of rounds) | CPU ms per request |")
    print("|---|---|---|---|---|")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await interleaved_latency(session, urls, handles, 4, 1, 16)  # warm: connections, tokenizer
        for conc in args.concurrency:
            rounds = []
            cpu_total = dict.fromkeys(urls, 0.0)
            for _ in range(args.rounds):
                lat, cpu = await interleaved_latency(session, urls, handles, conc, 1, args.requests)
                rounds.append({n: statistics.median(v) for n, v in lat.items()})
                for n, c in cpu.items():
                    cpu_total[n] += c
            n_req = args.rounds * max(1, args.requests // conc) * conc
            for name in urls:
                p50 = statistics.median(r[name] for r in rounds)
                added = (
                    ""
                    if name == "direct"
                    else f"{statistics.median(r[name] - r['direct'] for r in rounds):+.2f}"
                )
                cpu_ms = "" if name == "direct" else f"{cpu_total[name] / n_req * 1000:.2f}"
                print(f"| {conc} | {name} | {p50:.2f} | {added} | {cpu_ms} |")
            routing = statistics.median(r["ollamon-3"] - r["ollamon-1"] for r in rounds)
            print(f"| {conc} | routing (ollamon-3 - ollamon-1) | | {routing:+.2f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64, help="requests per target per round")
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs, urls, pids = start(Path(tmp), args)
        try:
            asyncio.run(run(args, urls, pids))
        finally:
            stop_processes(procs)


if __name__ == "__main__":
    main()
