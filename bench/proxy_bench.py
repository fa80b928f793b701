"""What ollamon adds to latency, side by side with a direct call (and nginx, when installed).

Starts the emulator and ``ollamon serve`` as subprocesses (plus nginx with ``proxy_buffering off`` if the
``nginx`` binary exists), then drives 100-token streams at several concurrencies, interleaving the targets
round by round so that they share the machine's conditions. Prints tables of TTFT and total latency
(p50/p99), the added latency versus direct, the maximum streamed requests/s, and ollamon's CPU per request
and peak RSS.

    python bench/proxy_bench.py [--rounds 5] [--concurrency 1,16,64] [--interval-ms 20] [--tokens 100]

With ``--upstream URL`` it measures your own Ollama instead: no emulator, nginx or naive proxy, only
``ollamon serve`` in front of that server, direct vs ollamon interleaved round by round, with ``--model``
(which must be pulled there) and ``options.num_predict = --tokens``, temperature 0 and a fixed seed so that both
targets generate the same answer. The throughput table then reuses that upstream as it is (its own pacing):

    python bench/proxy_bench.py --upstream http://127.0.0.1:11434 --model llama3.2 [--concurrency 1,4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
from common import free_port, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent


def upstream_url(value: str) -> str:
    """``--upstream`` as a base URL: ``host:port`` gets ``http://``, a trailing slash goes."""
    return (value if "://" in value else f"http://{value}").rstrip("/")


def check_model(url: str, model: str) -> None:
    """Exit with a clear message unless ``url`` answers /api/show for ``model`` (pulled, server up)."""
    req = urllib.request.Request(f"{url}/api/show", data=json.dumps({"model": model}).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        sys.exit(f"{url}: model {model!r} not available (HTTP {exc.code}); pull it or pass --model")
    except OSError as exc:
        sys.exit(f"{url}: cannot reach the upstream ({exc})")


@contextlib.contextmanager
def servers(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, str | int]]:
    if args.upstream:
        with ollamon_only(args, tmp) as targets:
            yield targets
        return
    emu_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "OLLAMON_CONFIG": ""}
    py = sys.executable
    procs = [
        subprocess.Popen(
            [
                py,
                "-m",
                "proxy",
                "emulate",
                "--listen",
                f"127.0.0.1:{emu_port}",
                "--start-loaded",
                "--parallel",
                "1000",
                "--tokens",
                str(args.tokens),
                "--token-interval-ms",
                str(args.interval_ms),
                "--prompt-eval-ms",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    wait_http(f"http://127.0.0.1:{emu_port}/")
    ollamon = subprocess.Popen(
        [
            py,
            "-m",
            "proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--upstream",
            f"127.0.0.1:{emu_port}",
            "--db",
            str(tmp / "bench.db"),
            "--no-redis",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(ollamon)
    wait_http(f"http://127.0.0.1:{proxy_port}/ollamon/health")
    targets: dict[str, str | int] = {
        "direct": f"http://127.0.0.1:{emu_port}",
        "ollamon": f"http://127.0.0.1:{proxy_port}",
        "ollamon_pid": ollamon.pid,
    }
    for tree in args.tree:  # another checkout's ollamon, side by side on the same emulator
        other_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    py,
                    "-m",
                    "proxy",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{other_port}",
                    "--upstream",
                    f"127.0.0.1:{emu_port}",
                    "--db",
                    str(tmp / f"bench-{other_port}.db"),
                    "--no-redis",
                    "--log-level",
                    "warning",
                ],
                cwd=tree,
                env={**env, "PYTHONPATH": str(tree)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_http(f"http://127.0.0.1:{other_port}/ollamon/health")
        targets[f"ollamon@{Path(tree).name}"] = f"http://127.0.0.1:{other_port}"
    naive_port = free_port()
    procs.append(
        subprocess.Popen(
            [py, str(ROOT / "bench" / "naive_proxy.py"), str(naive_port), f"http://127.0.0.1:{emu_port}"],
            cwd=ROOT,
            env=env,
        )
    )
    wait_http(f"http://127.0.0.1:{naive_port}/")
    targets["naive-aiohttp"] = f"http://127.0.0.1:{naive_port}"
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx and not args.no_nginx:
        nginx_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"""worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  upstream ollama {{ server 127.0.0.1:{emu_port}; keepalive 128; }}
  server {{ listen 127.0.0.1:{nginx_port};
    location / {{ proxy_pass http://ollama; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{emu_port}; proxy_buffering off; proxy_request_buffering off;
      proxy_read_timeout 600s; }} }} }}
"""
        )
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"]))
        wait_http(f"http://127.0.0.1:{nginx_port}/")
        targets["nginx"] = f"http://127.0.0.1:{nginx_port}"
    try:
        yield targets
    finally:
        stop_processes(procs)


@contextlib.contextmanager
def ollamon_only(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, str | int]]:
    """``ollamon serve`` in front of ``--upstream``: the targets are that server and ollamon."""
    proxy_port = free_port()
    cmd = [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{proxy_port}"]
    cmd += [
        "--upstream",
        args.upstream,
        "--db",
        str(tmp / "bench.db"),
        "--no-redis",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OLLAMON_CONFIG": ""}
    ollamon = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{proxy_port}/ollamon/health", timeout=60)
        yield {
            "direct": args.upstream,
            "ollamon": f"http://127.0.0.1:{proxy_port}",
            "ollamon_pid": ollamon.pid,
        }
    finally:
        stop_processes([ollamon])


@dataclass
class Samples:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: int = 0


BODY: dict[str, object] = {"model": "llama3.2", "prompt": "benchmark"}


async def one_stream(session: aiohttp.ClientSession, url: str, out: Samples) -> None:
    body = BODY
    start = time.perf_counter()
    first = None
    try:
        async with session.post(f"{url}/api/generate", json=body) as resp:
            async for _chunk in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
            if resp.status != 200:
                out.errors += 1
                return
    except aiohttp.ClientError:
        out.errors += 1
        return
    end = time.perf_counter()
    out.ttft.append(((first or end) - start) * 1000)
    out.total.append((end - start) * 1000)


async def batch(session: aiohttp.ClientSession, url: str, concurrency: int, out: Samples) -> None:
    await asyncio.gather(*(one_stream(session, url, out) for _ in range(concurrency)))


async def throughput(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    sink = Samples()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await one_stream(session, url, sink)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d, servers(args, Path(d)) as targets:
        trees = [f"ollamon@{Path(t).name}" for t in args.tree]
        names = [n for n in ("direct", "ollamon", *trees, "naive-aiohttp", "nginx") if n in targets]
        proc = psutil.Process(int(targets["ollamon_pid"]))
        peak_rss = proc.memory_info().rss
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
            for name in names:  # warm connections and code paths
                await batch(s, str(targets[name]), 4, Samples())
            pacing = (
                f"model {args.model} at {args.upstream}"
                if args.upstream
                else (f"{args.interval_ms} ms between tokens")
            )
            print(
                f"# {args.tokens}-token streams, {pacing}, {args.rounds} rounds, "
                f"targets interleaved per round; times in ms\n"
            )
            results: dict[tuple[int, str], Samples] = {}
            cpu_s = 0.0
            n_proxied = 0
            for c in args.concurrency:
                for _ in range(args.rounds):
                    for name in names:
                        samples = results.setdefault((c, name), Samples())
                        before = proc.cpu_times()
                        await batch(s, str(targets[name]), c, samples)
                        if name == "ollamon":
                            after = proc.cpu_times()
                            cpu_s += (after.user + after.system) - (before.user + before.system)
                            n_proxied += c
                        peak_rss = max(peak_rss, proc.memory_info().rss)
            print(
                "| conc | target | TTFT p50 | TTFT p99 | total p50 | total p99 | added TTFT p50 | "
                "added TTFT p99 | added total p50 | added total p99 | errors |"
            )
            print("|---" * 11 + "|")
            for c in args.concurrency:
                d_ = results[(c, "direct")]
                for name in names:
                    r = results[(c, name)]
                    added = (
                        f"{pct(r.ttft, 0.5) - pct(d_.ttft, 0.5):+.2f} | {pct(r.ttft, 0.99) - pct(d_.ttft, 0.99):+.2f} | "
                        f"{pct(r.total, 0.5) - pct(d_.total, 0.5):+.2f} | {pct(r.total, 0.99) - pct(d_.total, 0.99):+.2f}"
                    )
                    if name == "direct":
                        added = " |  |  | "
                    print(
                        f"| {c} | {name} | {pct(r.ttft, 0.5):.2f} | {pct(r.ttft, 0.99):.2f} | {pct(r.total, 0.5):.1f} | "
                        f"{pct(r.total, 0.99):.1f} | {added} | {r.errors} |"
                    )
            print()
            tp_pacing = "the upstream's own pacing" if args.upstream else "no pacing"
            print(
                f"| target | max streamed req/s ({args.tokens} tokens, {tp_pacing}, {args.tp_concurrency} streams, "
                f"{args.tp_seconds:g} s) |"
            )
            print("|---|---|")
            await s.close()
        # Throughput with unpaced tokens needs its own emulator settings; a real upstream is used as it is.
    with tempfile.TemporaryDirectory() as d:
        tp_args = argparse.Namespace(**{**vars(args), "interval_ms": 0})
        with servers(tp_args, Path(d)) as targets:
            connector = aiohttp.TCPConnector(limit=0)
            proc = psutil.Process(int(targets["ollamon_pid"]))
            async with aiohttp.ClientSession(connector=connector) as s:
                for name in names:
                    rate = await throughput(s, str(targets[name]), args.tp_concurrency, args.tp_seconds)
                    peak_rss = max(peak_rss, proc.memory_info().rss)
                    print(f"| {name} | {rate:.0f} |")
    print()
    print("| ollamon CPU per proxied stream (paced runs) | ollamon peak RSS |")
    print("|---|---|")
    print(f"| {cpu_s / max(1, n_proxied) * 1000:.2f} ms | {peak_rss / 2**20:.0f} MiB |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], help="another checkout's ollamon to compare")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tp-concurrency", type=int, default=64)
    parser.add_argument("--tp-seconds", type=float, default=5.0)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--upstream", metavar="URL", help="your own Ollama: direct vs ollamon only")
    parser.add_argument("--model", default="llama3.2", help="the model to stream (default llama3.2)")
    args = parser.parse_args()
    BODY["model"] = args.model
    if args.upstream:
        if args.tree:
            parser.error("--tree is not supported with --upstream")
        args.upstream = upstream_url(args.upstream)
        check_model(args.upstream, args.model)
        BODY["options"] = {"num_predict": args.tokens, "temperature": 0, "seed": 1}
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
