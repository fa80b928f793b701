"""What the OTLP span export costs a request: ollamon with the export off, on (receiver up), and on with the
receiver down, side by side on one emulator.

Starts the emulator, an OTLP/HTTP receiver (this script with ``--receiver``: it decodes every body with
opentelemetry-proto and counts the spans) and three ``ollamon serve`` processes, then drives streamed
``/api/generate`` requests at concurrency 1 and 16, interleaving the targets round by round so that they
share the machine's conditions. Prints p50/p99 latency, the ratio of the p50 to the export-off p50, the
ollamon process's CPU per request, and how many spans reached the receiver.

    python bench/otel_bench.py [--rounds 5] [--requests 20] [--tokens 20] [--interval-ms 1]
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

import aiohttp
import psutil
from common import free_port, interleaved_latency, stop_processes, timed_generate, wait_http

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("otel off", "otel on", "otel on, receiver down")


def receiver(port: int) -> None:
    """A minimal collector: decode each OTLP/HTTP traces body, count spans, answer GET /count."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

    count = 0

    async def traces(request: web.Request) -> web.Response:
        nonlocal count
        msg = pb.ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        count += sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)
        return web.Response(body=pb.ExportTraceServiceResponse().SerializeToString())

    async def get_count(request: web.Request) -> web.Response:
        return web.Response(text=str(count))

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", get_count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@contextlib.contextmanager
def servers(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, tuple[str, int]]]:
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OLLAMON_CONFIG"] = ""
    emu_port, recv_port = free_port(), free_port()
    quiet = {"cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [
                *(py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"),
                *("--parallel", "1000", "--tokens", str(args.tokens)),
                *("--token-interval-ms", str(args.interval_ms), "--prompt-eval-ms", "0"),
            ],
            env=env,
            **quiet,  # type: ignore[arg-type]
        ),
        subprocess.Popen([py, __file__, "--receiver", str(recv_port)], env=env, **quiet),  # type: ignore[arg-type]
    ]
    wait_http(f"http://127.0.0.1:{emu_port}/")
    wait_http(f"http://127.0.0.1:{recv_port}/count")
    otel = {
        "otel off": {},
        "otel on": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{recv_port}"},
        "otel on, receiver down": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    }
    targets: dict[str, tuple[str, int]] = {}
    try:
        for name, extra in otel.items():
            port = free_port()
            p = subprocess.Popen(
                [
                    *(py, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}"),
                    *("--upstream", f"127.0.0.1:{emu_port}", "--db", str(tmp / f"{port}.db")),
                    *("--no-redis", "--log-level", "error"),
                ],
                env={**env, **extra},
                **quiet,  # type: ignore[arg-type]
            )
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/ollamon/health")
            targets[name] = (f"http://127.0.0.1:{port}", p.pid)
        targets["receiver"] = (f"http://127.0.0.1:{recv_port}", 0)
        yield targets
    finally:
        stop_processes(procs)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d, servers(args, Path(d)) as targets:
        procs = {n: psutil.Process(targets[n][1]) for n in TARGETS}
        sent = dict.fromkeys(TARGETS, 0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for name in TARGETS:  # warm connections and code paths
                await asyncio.gather(*(timed_generate(s, targets[name][0], []) for _ in range(8)))
                sent[name] += 8
            start_cpu = {n: procs[n].cpu_times() for n in TARGETS}
            counted = dict.fromkeys(TARGETS, 0)
            print(
                f"# {args.tokens}-token streams, {args.interval_ms} ms apart; {args.rounds} rounds of "
                f"{args.requests} requests per target and concurrency, targets interleaved; times in ms\n"
            )
            print("| concurrency | target | p50 | p99 | p50 / off | CPU ms per request |")
            print("|---|---|---|---|---|---|")
            for c in (1, 16):
                urls = {n: targets[n][0] for n in TARGETS}
                lat, cpu = await interleaved_latency(s, urls, procs, c, args.rounds, args.requests)
                n = len(lat["otel off"])
                base = pct(lat["otel off"], 0.5)
                for name in TARGETS:
                    sent[name] += len(lat[name])
                    counted[name] += len(lat[name])
                    p50 = pct(lat[name], 0.5)
                    print(
                        f"| {c} | {name} | {p50:.2f} | {pct(lat[name], 0.99):.2f} | {p50 / base:.3f} "
                        f"| {cpu[name] / n * 1000:.2f} |"
                    )
            deadline = time.monotonic() + 15  # the SDK exports every 5 s by default (OTEL_BSP_SCHEDULE_DELAY)
            got = 0
            while time.monotonic() < deadline:
                async with s.get(f"{targets['receiver'][0]}/count") as r:
                    got = int(await r.text())
                if got >= sent["otel on"]:
                    break
                await asyncio.sleep(0.5)
        print(f"\nspans received for 'otel on': {got} of {sent['otel on']} requests")
        # Spans are built and exported after the requests (on commit, every 5 s): count that CPU too.
        print("\n| target | ollamon CPU ms per request, whole run (export work included) |\n|---|---|")
        for name in TARGETS:
            t0, t1 = start_cpu[name], procs[name].cpu_times()
            used = (t1.user + t1.system) - (t0.user + t0.system)
            print(f"| {name} | {used / counted[name] * 1000:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=32, help="requests per round, target and concurrency")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--interval-ms", type=float, default=1.0)
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver(args.receiver)
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
