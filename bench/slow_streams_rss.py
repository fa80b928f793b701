"""What ollamon holds while many slow streams are open: its RSS and open file descriptors (issue 15).

Starts the emulator and ``ollamon serve`` as subprocesses, then opens ``--streams`` concurrent streamed
``/api/generate`` requests through ollamon that the emulator paces slowly (``X-Emulate: interval_ms=…;
tokens=…``), so that every stream stays open, trickling one token per interval, for longer than the bench
holds it. The client reads every byte as it comes (these are slow generations, not slow readers; for clients
that never read see bench/slow_clients.py). Once every stream has had its first token, it samples the proxy's
RSS and file descriptors (psutil) for ``--hold-s`` seconds, then closes every stream from the client side,
waits for ollamon to record them, and samples again.

    python bench/slow_streams_rss.py [--streams 1000] [--hold-s 10] [--interval-ms 500] [--tracemalloc]
    python bench/slow_streams_rss.py --root /tmp/before   # ollamon from another checkout (before/after)

Each stream costs ollamon two sockets (client and upstream), so the bench raises its own soft
``RLIMIT_NOFILE`` (inherited by the servers it starts) and sets ``server.max_connections`` above
``--streams`` in a temporary config file. ``--tracemalloc`` runs the server under a small wrapper that starts
``tracemalloc`` and writes the top allocation sites to a file on SIGUSR1 (the server itself is unchanged;
tracing slows it and adds its own memory, so the RSS of that run is not the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from common import count_rows, free_port, stop_processes, wait_http

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# Runs ``python -m proxy serve ...`` with tracemalloc on; SIGUSR1 writes the top 25 lines to $TRACE_OUT.
_TRACE_WRAPPER = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(int(os.environ.get("TRACE_FRAMES", "1")))
def dump(*_):
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snap.statistics("lineno")
    with open(os.environ["TRACE_OUT"], "w") as f:
        f.write(f"traced total {sum(s.size for s in stats) / 2**20:.1f} MiB\\n")
        for s in stats[:25]:
            f.write(f"{s.size / 2**20:8.2f} MiB {s.count:8d} blocks  {s.traceback}\\n")
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["proxy", *sys.argv[1:]]
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (capped by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def sample(proc: psutil.Process) -> tuple[float, int]:
    return proc.memory_info().rss / MIB, proc.num_fds()


def settle(proc: psutil.Process, timeout_s: float = 30.0) -> None:
    """Wait until the idle server's RSS holds still (within 0.5 MiB for 2 s): the tokenizer loads on a
    thread after startup, and "RSS before" taken during that load made the per-stream figure swing."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(sample(proc)[0])
        if len(seen) >= 5 and max(seen[-5:]) - min(seen[-5:]) < 0.5:
            return
        time.sleep(0.5)


async def open_streams(url: str, args: argparse.Namespace, proc: psutil.Process) -> dict[str, float]:
    header = {"X-Emulate": f"interval_ms={args.interval_ms:g}; tokens={args.tokens}"}
    body = {"model": "llama3.2", "prompt": "slow stream"}
    opened = 0
    all_open = asyncio.Event()
    errors: list[str] = []

    async def stream(session: aiohttp.ClientSession) -> None:
        nonlocal opened
        try:
            async with session.post(f"{url}/api/generate", json=body, headers=header) as resp:
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}")
                    return
                first = True
                async for _ in resp.content.iter_any():
                    if first:
                        first = False
                        opened += 1
                        if opened == args.streams:
                            all_open.set()
        except aiohttp.ClientError as exc:
            errors.append(type(exc).__name__)

    out: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        tasks = [asyncio.ensure_future(stream(session)) for _ in range(args.streams)]
        deadline = started + args.open_timeout_s
        while not all_open.is_set() and time.monotonic() < deadline:
            if errors and len(errors) + opened >= args.streams:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_open.wait(), 0.5)
        out["open_s"] = time.monotonic() - started
        out["opened"] = opened
        rss, fds = [], []
        hold_end = time.monotonic() + args.hold_s
        while time.monotonic() < hold_end:
            r, f = sample(proc)
            rss.append(r)
            fds.append(f)
            await asyncio.sleep(0.25)
        out["rss_open_mib"] = max(rss)
        out["fds_open"] = max(fds)
        out["still_open"] = sum(not t.done() for t in tasks)
        if args.tracemalloc:
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(3.0)  # a snapshot of ~1M traces takes a while on a busy machine
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out["errors"] = len(errors)
    if errors:
        print(f"errors: {sorted(set(errors))}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--hold-s", type=float, default=10.0, help="how long to sample with all open")
    parser.add_argument("--interval-ms", type=float, default=500.0, help="emulator pacing between tokens")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per stream (outlasts the hold)")
    parser.add_argument("--open-timeout-s", type=float, default=90.0)
    parser.add_argument("--tracemalloc", action="store_true", help="write the server's top allocations")
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="run ollamon from this checkout (e.g. a `git worktree` of an older commit, for before/after)",
    )
    args = parser.parse_args()

    limit = raise_nofile(3 * args.streams + 512)  # client + ollamon's two + the emulator's, and headroom
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "config.yaml"
        config.write_text(f"server:\n  max_connections: {max(1024, args.streams + 64)}\n")
        env = {**os.environ, "OLLAMON_CONFIG": str(config)}
        emu_port, port = free_port(), free_port()
        py = sys.executable
        emu = [py, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{emu_port}", "--start-loaded"]
        emu += ["--parallel", str(args.streams + 16), "--prompt-eval-ms", "0"]
        db = tmp / "bench.db"
        serve = ["serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{emu_port}"]
        serve += ["--db", str(db), "--no-redis", "--log-level", "error"]
        trace_out = tmp / "tracemalloc.txt"
        if args.tracemalloc:
            server_cmd = [py, "-c", _TRACE_WRAPPER, *serve]
            env["TRACE_OUT"] = str(trace_out)
        else:
            server_cmd = [py, "-m", "proxy", *serve]
        quiet = {"cwd": args.root, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs = [subprocess.Popen(emu, **quiet)]  # type: ignore[call-overload]
        try:
            wait_http(f"http://127.0.0.1:{emu_port}/")
            procs.append(subprocess.Popen(server_cmd, **quiet))  # type: ignore[call-overload]
            wait_http(f"http://127.0.0.1:{port}/ollamon/health", timeout=60)
            proc = psutil.Process(procs[-1].pid)
            settle(proc)
            rss_before, fds_before = sample(proc)
            res = asyncio.run(open_streams(f"http://127.0.0.1:{port}", args, proc))
            closed = time.monotonic()
            while count_rows(db) < res["opened"] and time.monotonic() < closed + 60:
                time.sleep(0.25)
            res["rows"] = count_rows(db)
            time.sleep(2.0)
            rss_after, fds_after = sample(proc)
        finally:
            stop_processes(procs)
        if args.tracemalloc and trace_out.exists():
            print(trace_out.read_text())

    print(f"# `{' '.join(['python', 'bench/slow_streams_rss.py', *sys.argv[1:]])}`")
    print(
        f"# {args.streams} streams, {args.interval_ms:g} ms between tokens, held {args.hold_s:g} s "
        f"(all open after {res['open_s']:.1f} s); RLIMIT_NOFILE soft {limit[0]}"
        + (" ; tracemalloc ON: RSS inflated by tracing" if args.tracemalloc else "")
        + "\n"
    )
    print(
        "| streams | opened | RSS before (MiB) | RSS all open (MiB) | RSS after close (MiB) | per stream (KiB) "
        "| fds before | fds all open | fds after | records | errors |"
    )
    print("|---" * 11 + "|")
    per_stream = (res["rss_open_mib"] - rss_before) * 1024 / max(1, res["opened"])
    print(
        f"| {args.streams} | {res['opened']:.0f} | {rss_before:.1f} | {res['rss_open_mib']:.1f} | "
        f"{rss_after:.1f} | {per_stream:.1f} | {fds_before} | {res['fds_open']:.0f} | {fds_after} | "
        f"{res['rows']:.0f} | {res['errors']:.0f} |"
    )


if __name__ == "__main__":
    main()
