"""Where ollamon's CPU goes per proxied stream: CPU ms per stream, then a cProfile table of the hot path.

Starts the emulator (paced 100-token streams) and ``ollamon serve`` twice: once plain, to measure CPU time
per proxied stream (psutil, whole process: user + system), and once under cProfile, switched on only while
the load runs (SIGUSR1 on, SIGUSR2 off and dump), so startup and shutdown are not in the table. For each
concurrency it prints the top functions by own time, as µs per proxied stream and % of the profiled time.
cProfile slows Python code down (C calls less), so its µs are inflated; the plain run's CPU ms is the real
figure and the table says where it goes.

    python bench/hot_path_profile.py [--concurrency 1,16] [--rounds 10] [--top 25]

Each concurrency runs ``--rounds`` batches (1 stream: 10 streams of 2 s; 16 streams: 160 streams). At 1 stream
the CPU per stream also carries the background work of the seconds it lasts (sampler, writer flushes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from common import free_port, stop_processes, timed_generate, wait_http

ROOT = Path(__file__).resolve().parent.parent

# Run as the ollamon process under cProfile: ``python bench/hot_path_profile.py --serve-profiled OUT -- ARGS``.
_PROFILED = """
import cProfile, signal, sys
from proxy.cli.main import main
prof = cProfile.Profile()
out = sys.argv[1]
def on(*_): prof.enable()
def off(*_):
    prof.disable(); prof.dump_stats(out); prof.clear()
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
sys.exit(main(sys.argv[2:]))
"""


def start(
    tmp: Path, args: argparse.Namespace, profile_out: Path | None
) -> tuple[list[subprocess.Popen[bytes]], str, int]:
    emu_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "OLLAMON_CONFIG": ""}
    py = sys.executable
    emu_cmd = [py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"]
    emu_cmd += [
        "--parallel",
        "1000",
        "--tokens",
        str(args.tokens),
        "--token-interval-ms",
        str(args.interval_ms),
    ]
    emu_cmd += ["--prompt-eval-ms", "0"]
    emu = subprocess.Popen(
        emu_cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{emu_port}/")
    serve = ["serve", "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{emu_port}"]
    serve += ["--db", str(tmp / f"p{proxy_port}.db"), "--no-redis", "--log-level", "warning"]
    cmd = [py, "-c", _PROFILED, str(profile_out), *serve] if profile_out else [py, "-m", "proxy", *serve]
    proxy = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{proxy_port}"
    wait_http(f"{url}/ollamon/health")
    return [emu, proxy], url, proxy.pid


async def load(url: str, concurrency: int, streams: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for _ in range(max(1, streams // concurrency)):
            await asyncio.gather(*(timed_generate(s, url, []) for _ in range(concurrency)))


async def warm(url: str) -> None:
    await load(url, 4, 8)


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def loop_cpu_s(p: psutil.Process) -> float:
    """CPU seconds of the main thread (the event loop: the request path); the rest is worker threads."""
    for t in p.threads():
        if t.id == p.pid:
            return float(t.user_time + t.system_time)
    return 0.0


def measure_cpu(args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """CPU ms per proxied stream, plain ollamon (no profiler), per concurrency: whole process, event loop."""
    out: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        procs, url, pid = start(Path(d), args, None)
        try:
            proc = psutil.Process(pid)
            asyncio.run(warm(url))
            for c in args.concurrency:
                n = args.rounds * c
                before, loop_before = cpu_s(proc), loop_cpu_s(proc)
                asyncio.run(load(url, c, n))
                out[c] = ((cpu_s(proc) - before) / n * 1000, (loop_cpu_s(proc) - loop_before) / n * 1000)
        finally:
            stop_processes(procs)
    return out


def profile(args: argparse.Namespace, c: int) -> tuple[pstats.Stats, int]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "hot.prof"
        procs, url, pid = start(Path(d), args, out)
        try:
            asyncio.run(warm(url))
            n = args.rounds * c
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.2)
            asyncio.run(load(url, c, n))
            time.sleep(0.3)  # the last records reach the writer
            os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 20
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            stats = pstats.Stats(str(out))
        finally:
            stop_processes(procs)
    return stats, n


def where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":
        return name
    rel = file.replace(str(ROOT) + "/", "")
    if "site-packages/" in rel:
        rel = rel.split("site-packages/", 1)[1]
    return f"{rel}:{line}({name})"


def _pick(
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]], file_end: str, name: str, col: int
) -> float:
    return sum(v[col] for (f, _l, fn), v in raw.items() if f.endswith(file_end) and fn == name)


def groups(stats: pstats.Stats, n: int) -> None:
    """The profile folded into where the time goes: per chunk (read, write, parse), per request, the rest."""
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    relay = _pick(raw, "forward/upstream_client.py", "data_received", 3)
    write = _pick(raw, "forward/handler.py", "sink", 2)
    parse = sum(
        v[3]
        for (f, _l, fn), v in raw.items()
        if "/forward/streams/" in f and fn == "feed" and not f.endswith("lines.py")
    )
    # The request's task: the Host check wraps aiohttp's app handler, which runs the forwarder's handle();
    # plus aiohttp's protocol reading and parsing the request. (The sink calls for bytes that came with the
    # response head run inside it too: a little of "per chunk" is counted here.)
    task = max(_pick(raw, "proxy/guard.py", "check_host", 3), _pick(raw, "aiohttp/web_app.py", "_handle", 3))
    request = (
        task
        + _pick(raw, "aiohttp/web_protocol.py", "start", 3)
        + _pick(raw, "aiohttp/web_protocol.py", "data_received", 3)
    )
    rows = [
        ("per chunk: upstream read -> client write -> parser (all of it)", relay),
        ("  of which the client write (the sink's own time: mostly the send syscall)", write),
        ("  of which stream parsing (the parsers' feed)", parse),
        ("  of which the rest: llhttp, callbacks, bookkeeping", relay - write - parse),
        ("per request: aiohttp server, Host check, routing, handler, upstream send, response head", request),
        (
            "the rest of the loop thread: writer hand-off, sampler, alerts, exports, timers",
            total - relay - request,
        ),
    ]
    print("| where (event loop thread) | µs per stream | % of profiled |")
    print("|---|---|---|")
    for label, sec in rows:
        print(f"| {label} | {sec / n * 1e6:.0f} | {sec / total * 100:.0f} |")
    print()


def table(stats: pstats.Stats, n: int, top: int) -> None:
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(
        f"profiled time {total:.3f} s over {n} streams: {total / n * 1e6:.0f} µs per stream (cProfile-inflated)\n"
    )
    print("| function | calls per stream | own µs per stream | % of profiled | cumulative µs per stream |")
    print("|---|---|---|---|---|")
    for key, (_cc, nc, tt, ct, _callers) in rows:
        print(
            f"| `{where(key)}` | {nc / n:.1f} | {tt / n * 1e6:.1f} | {tt / total * 100:.1f} | {ct / n * 1e6:.0f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--rounds", type=int, default=10, help="batches of streams per concurrency")
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-profile", action="store_true", help="only the CPU ms per stream")
    args = parser.parse_args()
    print(f"# python bench/hot_path_profile.py {' '.join(sys.argv[1:])}\n")
    cpu = measure_cpu(args)
    print(
        "| streams at once | ollamon CPU ms per proxied stream (plain run) | of which the event loop thread |"
    )
    print("|---|---|---|")
    for c, (ms, loop_ms) in cpu.items():
        print(f"| {c} | {ms:.2f} | {loop_ms:.2f} |")
    print()
    if args.no_profile:
        return
    for c in args.concurrency:
        print(f"## {c} stream(s) at once, cProfile, top {args.top} by own time\n")
        stats, n = profile(args, c)
        groups(stats, n)
        table(stats, n, args.top)


if __name__ == "__main__":
    main()
