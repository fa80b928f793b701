"""``ollamon emulate``: serve the emulator on a port until SIGINT/SIGTERM.

The lead's CLI calls ``add_arguments`` on its sub-parser and ``run`` with the parsed namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys

from aiohttp import web

from .app import create_app
from .config import EmulatorConfig, KnobsError, default_models

__all__ = ["add_arguments", "build_config", "parse_listen", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``emulate`` flags to ``parser``."""
    defaults = EmulatorConfig()
    parser.add_argument(
        "--listen", default="127.0.0.1:11434", help="host:port to bind (default 127.0.0.1:11434)"
    )
    parser.add_argument("--tokens", type=int, default=defaults.default_tokens, help="tokens per response")
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=defaults.token_interval_s * 1000,
        help="time between tokens",
    )
    parser.add_argument(
        "--prompt-eval-ms", type=float, default=defaults.prompt_eval_s * 1000, help="prompt evaluation time"
    )
    parser.add_argument(
        "--load-ms", type=float, default=defaults.load_s * 1000, help="cold-load time per model"
    )
    parser.add_argument(
        "--parallel", type=int, default=defaults.num_parallel, help="parallel slots per model"
    )
    parser.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="requests waiting for a load"
    )
    parser.add_argument("--start-loaded", action="store_true", help="models start loaded (no cold load)")
    parser.add_argument(
        "--models", default="", help="comma list of model names (default: the built-in catalogue)"
    )
    parser.add_argument("--emulate", default="", help="default X-Emulate knobs, e.g. 'error_after=5'")


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``:port`` -> (host, port); the host defaults to 127.0.0.1."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--listen: bad port in {listen!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--listen: port out of range in {listen!r}")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    """An ``EmulatorConfig`` from parsed flags; ``--models`` picks from the catalogue or adds plain models."""
    host, _port = parse_listen(args.listen)
    catalogue = {spec.name: spec for spec in default_models()}
    models = default_models()
    if args.models:
        from .config import ModelSpec

        names = [name.strip() for name in args.models.split(",") if name.strip()]
        models = [catalogue.get(n) or catalogue.get(f"{n}:latest") or ModelSpec(name=n) for n in names]
    return EmulatorConfig(
        models=models,
        default_tokens=args.tokens,
        token_interval_s=args.token_interval_ms / 1000,
        prompt_eval_s=args.prompt_eval_ms / 1000,
        load_s=args.load_ms / 1000,
        num_parallel=args.parallel,
        max_queue=args.max_queue,
        start_loaded=args.start_loaded,
        host_check=_is_loopback(host),
        emulate=args.emulate,
    )


async def _serve(config: EmulatorConfig, host: str, port: int) -> None:
    runner = web.AppRunner(create_app(config), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"ollamon emulator listening on http://{host}:{port} (Ctrl-C to stop)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; return the process exit code."""
    try:
        config = build_config(args)
        host, port = parse_listen(args.listen)
    except (ValueError, KnobsError) as exc:
        print(f"ollamon emulate: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, host, port))
    except OSError as exc:
        print(f"ollamon emulate: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0
