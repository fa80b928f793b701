"""``ollamon usage --by key|team|model|user --since 30d [--format table|csv|json]``: who used what, at what cost.

Reads the database file (``--db``, else the config's ``storage.db``) through storage's usage report
(storage/usage_reads.py), or a running proxy's ``/ollamon/api/usage`` (``--url``); both give the same
figures. From the file, quotas come from the config (``usage.quotas``) with the current UTC day's and
month's use read from the same file; through ``--url`` they are the proxy's own book.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from proxy.answers import BadParameter
from proxy.api.params import parse_time
from proxy.cli.source import CliError, db_path, http_get, source_args
from proxy.cli.terminal import format_table, json_text, visible
from proxy.config import load_config
from proxy.errors import CONFIG_ERRORS
from proxy.usage.quota import QuotaBook, parse_quotas
from proxy.usage.reports import attach_quotas, seed_book, to_csv, to_rows
from storage.errors import StorageError
from storage.usage_reads import BY, MAX_ROWS, UsageReads

__all__ = ["cmd_usage", "register"]


def _local(args: argparse.Namespace, since: float, until: float) -> dict[str, Any]:
    reads = UsageReads(db_path(args))
    report = reads.usage(since, until, args.by, args.limit)
    try:
        quotas = parse_quotas(load_config(args.config).usage.quotas)
    except CONFIG_ERRORS as exc:
        raise CliError(f"config error: {exc}", 2) from exc
    if quotas:
        book = QuotaBook(quotas)
        seed_book(book, reads, time.time())
        attach_quotas(report, book)
    return report


def _report(args: argparse.Namespace) -> dict[str, Any]:
    if args.url:
        params = {"by": args.by, "since": args.since, "until": args.until, "limit": str(args.limit)}
        data: dict[str, Any] = http_get(args.url, "usage", {k: v for k, v in params.items() if v is not None})
        return data
    now = time.time()
    try:
        since = parse_time("since", args.since, now)
        until = parse_time("until", args.until, now) if args.until else now
    except BadParameter as exc:
        raise CliError(str(exc), 2) from exc
    if since >= until:
        raise CliError("bad parameter 'since': since must be before until", 2)
    try:
        return _local(args, since, until)
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc


def cmd_usage(args: argparse.Namespace) -> int:
    """Print the report as a table (with the window on top), CSV or the API's JSON."""
    try:
        report = _report(args)
    except CliError as exc:
        print(visible(f"ollamon: {exc}"), file=sys.stderr)
        return exc.status
    if args.format == "json":
        sys.stdout.write(json_text(report, indent=True) + "\n")
    elif args.format == "csv":
        sys.stdout.write(to_csv(report))
    else:
        w = report["window"]
        print(visible(f"usage by {report['by']}, {w['since']} .. {w['until']}"))
        head, rows = to_rows(report)
        print(format_table(head, rows))
        if report.get("truncated"):
            print(f"(largest {len(report['rows'])} of {report['groups']} groups; --limit shows more)")
    return 0


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_ROWS}")
    return value


def register(sub: Any) -> None:
    """Add ``ollamon usage`` to the ``ollamon`` subcommands."""
    p = sub.add_parser("usage", help="requests, tokens, cost and energy per key, team, model or user")
    source_args(p)
    p.add_argument("--by", choices=list(BY), default="model", help="group by (default model)")
    p.add_argument("--since", default="30d", help="start: a duration ago (30d), ISO-8601 or Unix time")
    p.add_argument("--until", help="end (default now)")
    p.add_argument("--limit", type=_limit, default=1000, metavar="N", help=f"groups at most (1..{MAX_ROWS})")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_usage)
