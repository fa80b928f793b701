"""``ollamon alerts [--firing] [--url URL | --db PATH]`` and ``ollamon alerts check [--config PATH]``.

``check`` validates a config file's rules and channels without starting anything, and exits with 2 and
the file/rule/field message on the first mistake, so it can run in CI before a deploy.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from alerts.errors import AlertStoreError
from alerts.rules import parse_alerts
from proxy.cli.terminal import format_table, json_text, visible
from proxy.errors import CONFIG_ERRORS
from storage.errors import StorageError
from storage.reads import Reads, is_postgres_url

__all__ = ["register"]

_STATES = ("firing", "pending", "resolved", "open", "all")


def register(sub: Any) -> None:
    """Add the ``alerts`` subcommand to ``ollamon``'s subparsers."""
    p = sub.add_parser("alerts", help="list alerts (from a running ollamon or its database), or check rules")
    p.add_argument("--firing", action="store_true", help="only alerts that are firing now")
    p.add_argument("--state", choices=_STATES, default="all", help="which alerts (default: all)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", metavar="URL", help="ask a running ollamon, e.g. http://127.0.0.1:11435")
    src.add_argument(
        "--db", metavar="PATH|URL", help="read this SQLite file or postgresql:// URL (default: the config's)"
    )
    p.add_argument("--config", metavar="PATH", help="config file used to find the database")
    p.add_argument("--limit", type=int, default=50, help="at most this many alerts (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_list)
    checks = p.add_subparsers(dest="alerts_command", metavar="check")
    check = checks.add_parser("check", help="validate the alert rules and channels of a config file")
    check.add_argument(
        "--config", metavar="PATH", help="config file (env OLLAMON_CONFIG; default ./config.yaml)"
    )
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from proxy.config import load_config

    try:
        config = load_config(args.config)
        spec = parse_alerts(config.alerts.rules, config.alerts.channels, config.source)
    except CONFIG_ERRORS as exc:
        print(visible(f"ollamon: config error: {exc}"), file=sys.stderr)
        return 2
    print(visible(f"{config.source}: {len(spec.rules)} rule(s), {len(spec.channels)} channel(s): ok"))
    for rule in spec.rules:
        groups = f" per {', '.join(rule.group_by)}" if rule.group_by else ""
        print(
            visible(
                f"  {rule.name} [{rule.severity}]{groups}: {rule.describe()} for {_seconds(rule.for_s)} s"
            )
        )
    return 0


def _seconds(value: float) -> str:
    """``120``, ``0.5``: no exponent, no trailing zeros."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _fetch(url: str, state: str, limit: int) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"state": state, "limit": limit})
    full = f"{url.rstrip('/')}/ollamon/api/alerts?{query}"
    try:
        with urllib.request.urlopen(full, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise AlertStoreError(f"{full}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AlertStoreError(f"{full}: {exc}") from exc
    alerts: list[dict[str, Any]] = body["alerts"]
    return alerts


def _read(path: Path | str, state: str, limit: int) -> list[dict[str, Any]]:
    """Alerts from the database (a file or a PostgreSQL URL), through storage's reads (read-only)."""
    if not is_postgres_url(path) and not Path(path).exists():
        raise AlertStoreError(f"{path}: no such database")
    try:
        return Reads(path).alerts(state, limit)
    except StorageError as exc:
        raise AlertStoreError(
            f"cannot read alerts ({exc}); is it an ollamon database opened by a version with alerts?"
        ) from exc


def run_list(args: argparse.Namespace) -> int:
    state = "firing" if args.firing else args.state
    try:
        if args.url:
            rows = _fetch(args.url, state, args.limit)
        else:
            db = args.db
            if db is None:
                from proxy.config import load_config

                storage = load_config(args.config).storage
                db = storage.url if storage.postgres else str(storage.db_path)
            rows = _read(db if is_postgres_url(db) else Path(db), state, args.limit)
    except CONFIG_ERRORS as exc:
        print(visible(f"ollamon: config error: {exc}"), file=sys.stderr)
        return 2
    except AlertStoreError as exc:
        print(visible(f"ollamon: {exc}"), file=sys.stderr)
        return 1
    if args.json:
        print(json_text(rows, indent=True))
        return 0
    if not rows:
        print(f"no {state if state != 'all' else ''} alerts".replace("  ", " "))
        return 0
    print(_table(rows))
    return 0


_COLUMNS = (
    "id",
    "state",
    "severity",
    "rule",
    "labels",
    "value",
    "threshold",
    "started_at",
    "notification_count",
    "last_error",
)


def _table(rows: list[dict[str, Any]]) -> str:
    """The alerts as a table; the shared table escapes every cell (labels and errors come from clients)."""
    cells = []
    for r in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))
        error = r.get("last_error")
        cells.append(
            [
                r["id"],
                r["state"],
                r["severity"],
                r["rule"],
                labels or None,
                r["value"],
                r["threshold"],
                r["started_at"],
                r["notification_count"],
                error[:60] if error else None,
            ]
        )
    return format_table(_COLUMNS, cells)
