"""The ``ollamon`` command: ``serve`` (the proxy) and ``emulate`` (an Ollama emulator to try it on)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.config import Config, load_config
from proxy.errors import CONFIG_ERRORS, ConfigError
from storage.errors import StorageError

__all__ = ["main"]

logger = logging.getLogger("ollamon")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollamon", description="A transparent monitoring proxy for Ollama.")
    parser.add_argument("--version", action="version", version=f"ollamon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy in front of Ollama")
    serve.add_argument(
        "--config", metavar="PATH", help="config file (env OLLAMON_CONFIG; default ./config.yaml)"
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (env OLLAMON_LISTEN)")
    serve.add_argument("--upstream", metavar="URL", help="Ollama's URL or host:port (env OLLAMON_UPSTREAM)")
    serve.add_argument(
        "--db", metavar="PATH|URL", help="SQLite database file (env OLLAMON_DB) or postgresql://... URL"
    )
    redis = serve.add_mutually_exclusive_group()
    redis.add_argument("--redis-url", metavar="URL", help="Redis for hot data (env OLLAMON_REDIS_URL)")
    redis.add_argument("--no-redis", action="store_true", help="turn Redis off whatever the config says")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")

    emulate = sub.add_parser("emulate", help="run an Ollama emulator (for trying ollamon without Ollama)")
    from proxy.emulator import cli as emulator_cli

    emulator_cli.add_arguments(emulate)
    # Feature subcommands register here: ``module.register(sub)`` adds parsers that set_defaults(func=...).
    from proxy.cli import alerts as alerts_cli

    alerts_cli.register(sub)
    from proxy.cli import analytics as cli_analytics

    cli_analytics.register(sub)
    from proxy.cli import conversations as conversations_cli
    from proxy.cli import keys as keys_cli
    from proxy.cli import usage as usage_cli

    keys_cli.register(sub)
    usage_cli.register(sub)
    conversations_cli.register(sub)
    # (feature subcommands are registered here)
    return parser


def _overrides(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    if args.listen:
        out[("server", "listen")] = args.listen
    if args.upstream:
        out[("server", "upstream")] = args.upstream
    if args.db:
        # A postgresql:// URL selects PostgreSQL (storage.url); anything else is the SQLite file.
        out[("storage", "url" if args.db.startswith(("postgresql://", "postgres://")) else "db")] = args.db
    if args.redis_url:
        out[("redis", "url")] = args.redis_url
    if args.no_redis:
        out[("redis", "url")] = ""
    if args.log_level:
        out[("log", "level")] = args.log_level
    return out


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, let streams finish, drain the writer."""
    from proxy.app import create_app, make_runner

    app = create_app(config)
    runner = make_runner(app, config)
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()  # the contexts that did start (the client session, ...) close again
        raise
    s = config.server
    site = web.TCPSite(runner, s.listen_host, s.listen_port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            config.source, "server.listen", f"cannot listen on {s.listen}: {exc.strerror}"
        ) from exc
    logger.info("ollamon %s listening on http://%s -> %s", __version__, s.listen, s.upstream_value)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info(
            "shutting down: finishing in-flight requests (grace %g s), flushing records", s.shutdown_grace_s
        )
    finally:
        await runner.cleanup()
    logger.info("stopped")


def _run(coro: Any, event_loop: str) -> None:
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            logger.warning("uvloop is not installed; using the asyncio event loop")
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is not None:
        # A feature subcommand: it registered ``func(args) -> exit status`` with set_defaults.
        return int(handler(args))
    if args.command == "emulate":
        from proxy.emulator import cli as emulator_cli

        setup_logging("info")
        return emulator_cli.run(args)
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except CONFIG_ERRORS as exc:
        print(f"ollamon: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level)
    try:
        _run(serve(config), config.server.event_loop)
    except CONFIG_ERRORS as exc:
        print(f"ollamon: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"ollamon: storage error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
