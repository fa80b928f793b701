"""What the Prometheus export costs: the time of one scrape at 1, 10 and 100 models, and a request's latency
through ollamon with the export on (and scraped every second) vs off, side by side.

Part 1 runs the real app in process (emulator upstream) and fills the export through its writer listener
with records of N models (every model on 3 routes, 2 status classes, all histograms populated) plus N
requests in flight, then times ``GET /ollamon/metrics`` over HTTP and the rendering alone.

Part 2 starts the emulator and two ``ollamon serve`` processes whose configs differ only in
``metrics.enabled``, drives streamed ``/api/generate`` requests at concurrency 1 and 16, interleaving the
targets round by round, and prints p50/p99, the p50 ratio and the ollamon process's CPU per request.

    python bench/exports_bench.py [--scrapes 200] [--rounds 5] [--requests 20] [--tokens 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web
from common import free_port, interleaved_latency, stop_processes, timed_generate, wait_http

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.app import create_app, make_runner  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.emulator import EmulatorConfig  # noqa: E402
from proxy.emulator import create_app as create_emulator  # noqa: E402
from proxy.exports.prometheus import PROMETHEUS_KEY  # noqa: E402
from proxy.forward.capture import Capture  # noqa: E402
from proxy.keys import FORWARDER_KEY  # noqa: E402
from storage.records import ErrorRecord, InferenceRecord  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def records(models: int) -> list[InferenceRecord]:
    out = []
    for m in range(models):
        for i, (endpoint, status) in enumerate((("/api/chat", 200), ("/api/generate", 200), ("/v1/embeddings", 200),
                                                ("/api/chat", 500))):  # fmt: skip
            ok = status == 200
            out.append(
                InferenceRecord(
                    timestamp="2026-01-01T00:00:00.000Z",
                    request_id=f"{m}-{i}",
                    model_name=f"model-{m}:latest",
                    endpoint=endpoint,
                    status_code=status,
                    success=ok,
                    response_time_ms=120.0 + i,
                    ttft_ms=None if endpoint == "/v1/embeddings" else 20.0 + i,
                    prompt_tokens=30,
                    completion_tokens=0 if endpoint == "/v1/embeddings" else 40,
                    queue_time_ms=1.5,
                    load_duration_ms=3.0,
                    energy_j=2.0,
                    error=None
                    if ok
                    else ErrorRecord("2026-01-01T00:00:00.000Z", f"{m}-{i}", "upstream_status", "x"),
                )
            )
    return out


async def scrape_times(
    models: int, scrapes: int, tmp: Path
) -> tuple[list[float], list[float], list[float], int, int]:
    """(HTTP scrape ms, render-only ms, render ms after every label set changed, body bytes, series) with
    ``models`` models recorded and in flight."""
    emu_runner = web.AppRunner(create_emulator(EmulatorConfig()))
    await emu_runner.setup()
    emu_port = free_port()
    await web.TCPSite(emu_runner, "127.0.0.1", emu_port).start()
    overrides = {
        ("server", "listen"): "127.0.0.1:0",
        ("server", "upstream"): f"http://127.0.0.1:{emu_port}",
        ("storage", "db"): str(tmp / f"scrape-{models}.db"),
        ("inventory", "enabled"): False,
    }
    config = load_config(None, env={}, overrides=overrides)
    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        exporter = app[PROMETHEUS_KEY]
        exporter.records.offer(records(models))
        live = app[FORWARDER_KEY].live
        for m in range(models):
            cap = Capture.__new__(Capture)
            cap.live_model = f"model-{m}:latest"
            cap.content_times = []
            live.add(cap)
        http: list[float] = []
        render: list[float] = []
        body = b""
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/ollamon/metrics"
            for _ in range(10):  # warm up (and fill the probe's cache)
                async with s.get(url) as r:
                    body = await r.read()
            for _ in range(scrapes):
                t0 = time.perf_counter()
                async with s.get(url) as r:
                    body = await r.read()
                http.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                exporter.render("")
                render.append((time.perf_counter() - t0) * 1000)
        changed: list[float] = []
        batch = records(models)
        for _ in range(max(10, scrapes // 10)):
            exporter.records.offer(batch)  # every label set observed again: nothing cached
            t0 = time.perf_counter()
            exporter.render("")
            changed.append((time.perf_counter() - t0) * 1000)
        live.clear()
        series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
        return http, render, changed, len(body), series
    finally:
        await runner.cleanup()
        await emu_runner.cleanup()


TARGETS = ("metrics off", "metrics on")


@contextlib.contextmanager
def servers(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, tuple[str, int]]]:
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OLLAMON_"))}
    emu_port = free_port()
    procs = [
        subprocess.Popen(
            [
                *(py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"),
                *("--parallel", "1000", "--tokens", str(args.tokens)),
                *("--token-interval-ms", str(args.interval_ms), "--prompt-eval-ms", "0"),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    wait_http(f"http://127.0.0.1:{emu_port}/")
    targets: dict[str, tuple[str, int]] = {}
    try:
        for name in TARGETS:
            port = free_port()
            cfg = tmp / f"{port}.yaml"
            cfg.write_text(f"metrics:\n  enabled: {'true' if name == 'metrics on' else 'false'}\n")
            p = subprocess.Popen(
                [
                    *(py, "-m", "proxy", "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"),
                    *("--upstream", f"127.0.0.1:{emu_port}", "--db", str(tmp / f"{port}.db")),
                    *("--no-redis", "--log-level", "error"),
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/ollamon/health")
            targets[name] = (f"http://127.0.0.1:{port}", p.pid)
        yield targets
    finally:
        stop_processes(procs)


async def scraper(session: aiohttp.ClientSession, url: str, stop: asyncio.Event, count: list[int]) -> None:
    """Prometheus at a 1 s interval (15 s is the usual default: this is 15 times the load)."""
    while not stop.is_set():
        async with session.get(f"{url}/ollamon/metrics") as r:
            await r.read()
            assert r.status == 200
        count[0] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def overhead(args: argparse.Namespace, tmp: Path) -> None:
    from storage.tasks import spawn

    with servers(args, tmp) as targets:
        procs = {n: psutil.Process(targets[n][1]) for n in TARGETS}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            for name in TARGETS:
                await asyncio.gather(*(timed_generate(s, targets[name][0], []) for _ in range(8)))
            stop, scrapes = asyncio.Event(), [0]
            task = spawn(scraper(s, targets["metrics on"][0], stop, scrapes), name="bench-scraper")
            print(
                f"\n## Proxy overhead: {args.tokens}-token streams {args.interval_ms} ms apart, {args.rounds} rounds "
                f"of {args.requests} requests per target and concurrency, targets interleaved, 'metrics on' "
                "scraped every second; times in ms\n"
            )
            print("| concurrency | target | p50 | p99 | p50 / off | CPU ms per request |")
            print("|---|---|---|---|---|---|")
            for c in (1, 16):
                urls = {n: targets[n][0] for n in TARGETS}
                lat, cpu = await interleaved_latency(s, urls, procs, c, args.rounds, args.requests)
                base = pct(lat["metrics off"], 0.5)
                for name in TARGETS:
                    p50 = pct(lat[name], 0.5)
                    print(
                        f"| {c} | {name} | {p50:.2f} | {pct(lat[name], 0.99):.2f} | {p50 / base:.3f} "
                        f"| {cpu[name] / len(lat[name]) * 1000:.2f} |"
                    )
            stop.set()
            await task
            print(f"\n{scrapes[0]} scrapes of 'metrics on' during the run")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"## Scrape time ({args.scrapes} scrapes each; each model: 4 requests recorded, 1 in flight)\n")
        print(
            "| models | series | body KiB | HTTP GET p50 ms | p95 ms | render p50 ms | p95 ms "
            "| render, all changed, p50 ms |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for models in (1, 10, 100):
            http, render, changed, size, series = await scrape_times(models, args.scrapes, tmp)
            print(
                f"| {models} | {series} | {size / 1024:.1f} | {statistics.median(http):.2f} | {pct(http, 0.95):.2f} "
                f"| {statistics.median(render):.2f} | {pct(render, 0.95):.2f} | {statistics.median(changed):.2f} |"
            )
        await overhead(args, tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--interval-ms", type=float, default=1.0)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
