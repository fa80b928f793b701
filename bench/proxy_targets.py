"""The targets bench/proxy_bench.py measures: the emulator, ``ollamon serve`` (and other checkouts' ollamon),
the naive aiohttp proxy and nginx, started as subprocesses; or ollamon alone in front of a real Ollama.

Each target is a URL under its name in the dict ``servers()`` yields; a process whose CPU the bench measures
also has its pid under ``NAME_pid``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common import free_port, stop_processes, wait_http

__all__ = ["ROOT", "check_model", "ollamon_only", "servers", "upstream_url"]

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
        targets[f"ollamon@{Path(tree).name}_pid"] = procs[-1].pid
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
    targets["naive-aiohttp_pid"] = procs[-1].pid
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
        targets["nginx_pid"] = procs[-1].pid  # the master; its worker is a child (see Cpu)
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
