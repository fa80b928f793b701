"""What clients that never read cost ollamon: memory held while they hang, and the time to record them after.

Starts one emulator and one ``ollamon serve`` per source tree given (this checkout by default; pass an older
checkout with ``--tree`` to compare side by side on the same emulator), opens ``--clients`` connections that
each ask for a long stream and never read a byte, and prints per tree: RSS before, RSS while they hang, the
records written after they close, and how long the writer took to write them.

    python bench/slow_clients.py [--clients 200] [--tokens 20000] [--hold-s 8] [--tree /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from common import count_rows

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/", timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not come up")


@contextlib.contextmanager
def process(cmd: list[str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "OLLAMON_CONFIG": "", "PYTHONPATH": str(cwd)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_tree(tree: Path, emu_port: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    port = free_port()
    db = tmp / f"{tree.name}-{port}.db"
    cmd = [sys.executable, "-m", "proxy", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--upstream", f"127.0.0.1:{emu_port}", "--db", str(db), "--no-redis", "--log-level", "error"]
    with process(cmd, tree) as proc:
        wait_http(port, "/ollamon/health")
        ps = psutil.Process(proc.pid)
        rss_before = ps.memory_info().rss
        body = b'{"model":"llama3.2","prompt":"write a lot"}'
        request = (
            b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        socks = []
        for _ in range(args.clients):
            s = socket.socket()
            if args.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
            s.connect(("127.0.0.1", port))
            s.sendall(request)
            socks.append(s)
        samples = []
        end = time.monotonic() + args.hold_s
        while time.monotonic() < end:
            samples.append(ps.memory_info().rss)
            time.sleep(0.25)
        rss_held = max(samples)
        cpu_before = sum(ps.cpu_times()[:2])
        closed = time.monotonic()
        for s in socks:
            s.close()
        deadline = closed + 120
        while count_rows(db) < args.clients and time.monotonic() < deadline:
            time.sleep(0.05)
        written = count_rows(db)
        record_s = time.monotonic() - closed
        cpu_s = sum(ps.cpu_times()[:2]) - cpu_before
        time.sleep(1.0)
        rss_after = ps.memory_info().rss
    return {
        "rss_before_mib": rss_before / MIB,
        "rss_held_mib": rss_held / MIB,
        "held_per_client_kib": (rss_held - rss_before) / args.clients / 1024,
        "rss_after_mib": rss_after / MIB,
        "rows": written,
        "record_s": record_s,
        "cpu_s_after_close": cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--hold-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rcvbuf", type=int, default=0, help="client SO_RCVBUF (0: the kernel's autotuning)")
    parser.add_argument(
        "--tree", action="append", default=[], help="another checkout to compare (repeatable)"
    )
    args = parser.parse_args()
    trees = [ROOT, *(Path(t).resolve() for t in args.tree)]
    results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        emu_port = free_port()
        emu = [
            sys.executable,
            "-m",
            "proxy",
            "emulate",
            "--listen",
            f"127.0.0.1:{emu_port}",
            "--start-loaded",
        ]
        emu += ["--parallel", "1000", "--tokens", str(args.tokens), "--token-interval-ms", "0"]
        emu += ["--prompt-eval-ms", "0"]
        with process(emu, ROOT):
            wait_http(emu_port)
            for _ in range(args.rounds):
                for tree in trees:
                    results[tree].append(run_tree(tree, emu_port, args, tmp))
    keys = list(next(iter(results.values()))[0])
    print(f"{args.clients} clients that never read, {args.tokens}-token streams, held {args.hold_s:g} s")
    print(f"{'tree':<28}" + "".join(f"{k:>22}" for k in keys))
    for tree, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"{str(tree)[-28:]:<28}" + "".join(f"{med[k]:>22.1f}" for k in keys))


if __name__ == "__main__":
    main()
