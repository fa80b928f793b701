"""``ollamon stats | requests | top | export | db stats | db prune``: the analytics from a terminal.

Each command reads the database file, read-only (``--db``, else the config's ``storage.db``), through
storage's read functions (``storage.reads.Reads``), or a running proxy's API (``--url
http://127.0.0.1:11435``); both give the same answers because both end in the same functions. ``db prune``
writes, so it only works on the file, through a writer of its own (``storage.prune.prune``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import signal
import sys
import time
from typing import Any

from proxy.answers import BadParameter
from proxy.api.params import parse_time
from proxy.cli.terminal import Table, cell, format_table, json_text, size, visible
from proxy.config import load_config
from proxy.errors import CONFIG_ERRORS
from storage.errors import StorageError
from storage.prune import prune
from storage.queries import QueryError
from storage.reads import Reads
from storage.retention import RetentionPolicy

__all__ = ["CliError", "fetch", "register"]


from proxy.cli.source import CliError, command, db_path, fetch, filter_args, source_args


def _print_json(data: Any) -> None:
    sys.stdout.write(json_text(data, indent=True) + "\n")


# One row per upstream or instance (``stats --by``): these figures, named as everywhere else.
_GROUP_FIGURES = (
    "requests",
    "failed",
    "error_rate",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "tokens_per_second_avg",
    "tokens_per_s",
    "prompt_tokens",
    "completion_tokens",
)


def _breakdown(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(by, upstream filter, instance filter): ``--upstream`` or ``--instance`` alone means ``--by`` it."""
    alone = [name for name in ("upstream", "instance") if getattr(args, name) is True]
    if len(alone) > 1 or (alone and args.by and args.by != alone[0]):
        raise CliError("one breakdown at a time: --by upstream (or --upstream alone), or --by instance", 2)
    by = args.by or (alone[0] if alone else None)
    upstream, instance = (None if v is True else v for v in (args.upstream, args.instance))
    return by, upstream, instance


def cmd_stats(args: argparse.Namespace) -> int:
    by, upstream, instance = _breakdown(args)
    params = {"since": args.since, "until": args.until, "model": args.model, "endpoint": args.endpoint}
    params |= {"user": args.user, "exact": args.exact, "upstream": upstream, "instance": instance, "by": by}
    data = fetch(args, "summary", params)
    if args.json:
        _print_json(data)
        return 0
    models = data.get("models", [])
    headers = ["figure", "all", *(m["model"] or "(unknown)" for m in models)]
    rows = [[name, value, *(m.get(name) for m in models)] for name, value in data["overall"].items()]
    w = data["window"]
    how = "exact" if data["exact"] else "from rollups, percentiles within 1%"
    print(visible(f"{w['since']} .. {w['until']}  ({how})"))
    print(format_table(headers, rows))
    res = [[k, v] for k, v in data.get("resources", {}).items()]
    if res:
        print()
        print(format_table(["resource", "value"], res))
    if by is not None:
        print()
        groups = [[g[by] or "(none)", *(g.get(n) for n in _GROUP_FIGURES)] for g in data.get("groups", [])]
        print(format_table([by, *_GROUP_FIGURES], groups))
    return 0


# (API field, header, minimum width, numeric). The minimums are the widest usual values, so rows printed
# by --follow after the first page line up with it; a wider model or endpoint is cut to fit.
_REQUEST_COLUMNS = (
    ("timestamp", "timestamp", len("2026-11-26T23:07:38.123Z"), False),
    ("model_name", "model", 20, False),
    ("endpoint", "endpoint", len("/v1/chat/completions"), False),
    ("status_code", "status", 0, True),
    ("success", "ok", 0, False),
    ("response_time_ms", "response_time_ms", len("1,234,567.89"), True),
    ("ttft_ms", "ttft_ms", len("123,456.78"), True),
    ("completion_tokens", "completion_tokens", 0, True),
    ("request_id", "request_id", 0, False),
)
_FOLLOW_PAGE = 200  # rows per read while following
_FOLLOW_PAGES = 5  # at most this many reads per poll; beyond that the older new rows are skipped
_FOLLOW_MEMORY = 2000  # keys of printed rows remembered, to find where the new ones end


def _request_cells(row: dict[str, Any]) -> list[Any]:
    return [row.get(field) for field, *_ in _REQUEST_COLUMNS]


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return (row["timestamp"], row["request_id"])


def _newer(
    args: argparse.Namespace, params: dict[str, Any], seen: dict[tuple[str, str], None]
) -> list[dict[str, Any]]:
    """Rows written after those in ``seen``, newest first (the API lists by write order, not timestamp)."""
    fresh: list[dict[str, Any]] = []
    cursor = None
    for _ in range(_FOLLOW_PAGES):
        page = fetch(args, "requests", params | {"limit": str(_FOLLOW_PAGE), "cursor": cursor})
        for row in page["requests"]:
            if _key(row) in seen:
                return fresh
            fresh.append(row)
        cursor = page.get("next_cursor")
        if cursor is None:
            return fresh
    print(
        f"ollamon: over {len(fresh):,} new requests since the last read; older ones skipped", file=sys.stderr
    )
    return fresh


def cmd_requests(args: argparse.Namespace) -> int:
    params = {"since": args.since, "model": args.model, "endpoint": args.endpoint, "user": args.user}
    params |= {"upstream": args.upstream, "instance": args.instance}
    params |= {"limit": str(args.limit), "success": "false" if args.failed else None}
    data = fetch(args, "requests", params)
    if args.json and not args.follow:
        _print_json(data)
        return 0
    rows: list[dict[str, Any]] = list(reversed(data["requests"]))
    table = Table.fit(
        [h for _, h, _, _ in _REQUEST_COLUMNS],
        [_request_cells(r) for r in rows],
        minimum=[w for *_, w, _ in _REQUEST_COLUMNS],
        numeric=[n for *_, n in _REQUEST_COLUMNS],
    )

    def show(batch: list[dict[str, Any]]) -> None:
        for r in batch:
            print(json_text(r) if args.json else table.row(_request_cells(r)), flush=True)

    if not args.json:
        print(table.head(), flush=True)
    show(rows)
    if not args.follow:
        return 0
    seen = dict.fromkeys(_key(r) for r in rows)
    # Ctrl-C sets a flag instead of raising KeyboardInterrupt: an exception raised while Python runs a
    # finalizer (a closed connection's, say) is printed as "ignored" and lost, and the loop would go on
    # (seen once in CI: the process outlived SIGINT by 30 s). The flag is checked every 0.1 s.
    stop: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    try:
        while not stop:
            waited = 0.0
            while waited < args.interval and not stop:
                time.sleep(min(0.1, args.interval - waited))
                waited += 0.1
            if stop:
                break
            fresh = list(reversed(_newer(args, params, seen)))
            show(fresh)
            seen.update(dict.fromkeys(_key(r) for r in fresh))
            for old in list(seen)[: max(0, len(seen) - _FOLLOW_MEMORY)]:
                del seen[old]
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path = db_path(args)
    now = time.time()
    try:
        since = parse_time("since", args.since, now) if args.since else 0.0
        until = parse_time("until", args.until, now) if args.until else now + 86400
    except BadParameter as exc:
        raise CliError(str(exc), 2) from exc
    try:
        with Reads(path).export_rows(args.table, since, until) as rows:
            names = list(next(rows))
            _write_export(args, names, rows)
    except QueryError as exc:
        raise CliError(f"--table {args.table}: no such table with a timestamp column", 2) from exc
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc
    return 0


def _write_export(args: argparse.Namespace, names: list[Any], rows: Any) -> None:
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    # CSV has no escapes: it is exact data for a file or a pipe, and only on a terminal (someone reading
    # it) are text cells shown with visible escapes, as ``ls`` does with odd file names.
    shown = visible if out is sys.stdout and out.isatty() else str
    try:
        if args.format == "csv":
            w = csv.writer(out)
            w.writerow(names)
            for row in rows:
                w.writerow(["" if v is None else shown(v) if isinstance(v, str) else v for v in row])
        else:
            for row in rows:
                out.write(json_text(dict(zip(names, row, strict=True))) + "\n")
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def cmd_db_stats(args: argparse.Namespace) -> int:
    data = fetch(args, "stats", {})
    if args.json:
        _print_json(data)
        return 0
    facts = [["path", data.get("path")]]
    if data.get("backend") == "postgresql":
        facts += [
            ["server_version", data.get("server_version")],
            ["database", size(data.get("database_bytes"))],
        ]
    else:
        facts += [[k, size(data.get(k))] for k in ("file_bytes", "wal_bytes", "page_size")]
        facts += [[k, data.get(k)] for k in ("page_count", "freelist_pages", "auto_vacuum")]
    print(format_table(["", "value"], facts))
    parts = [
        [t, p["partitions"], p["first_day"], p["last_day"]] for t, p in data.get("partitions", {}).items()
    ]
    if parts:
        print()
        print(format_table(["table", "day partitions", "first", "last"], parts))
    print()
    print(format_table(["table", "rows"], list(data["tables"].items())))
    spans = [[t, s["oldest"], s["newest"]] for t, s in data.get("records", {}).items()]
    if spans:
        print()
        print(format_table(["table", "oldest", "newest"], spans))
    if data.get("writer"):
        print()
        print(format_table(["writer", "value"], list(data["writer"].items())))
    run = data.get("last_retention_run")
    print()
    if run:
        deleted = sum(run["deleted"].values())
        print(visible(f"last retention run: {run['finished_at']}, deleted {deleted:,} rows"))
    else:
        print("last retention run: never")
    return 0


def cmd_db_prune(args: argparse.Namespace) -> int:
    if args.url:
        raise CliError("db prune works on the database file; pass --db (or none, for the config's)", 2)
    path = db_path(args)
    try:
        r = load_config(args.config).retention
    except CONFIG_ERRORS as exc:
        raise CliError(f"config error: {exc}", 2) from exc
    policy = RetentionPolicy(r.raw_days, r.system_days, r.rollup_days, r.batch_rows)
    try:
        result = asyncio.run(prune(path, policy, dry_run=args.dry_run, vacuum=args.vacuum))
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc
    if args.json:
        _print_json(result)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(format_table(["table", verb], sorted(result["deleted"].items())))
        if not args.dry_run:
            freed, longest = size(result["freed_bytes"]), cell(result["max_statement_ms"])
            print(f"freed {freed}; longest statement {longest} ms")
    if result["error"]:
        print(visible(f"ollamon: retention failed: {result['error']}"), file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    """Add the analytics subcommands to ``ollamon``'s subparsers."""
    from proxy.cli import top as cli_top

    p = sub.add_parser("stats", help="performance summary over a window (a table, or --json)")
    source_args(p)
    filter_args(p, breakdown=True)
    p.add_argument("--since", default="1h", help="start: a duration ago (1h), ISO-8601 or Unix time")
    p.add_argument("--until", help="end (default now)")
    p.add_argument(
        "--exact", choices=["auto", "true", "false"], help="force raw rows (true) or rollups (false)"
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=command(cmd_stats))

    p = sub.add_parser("requests", help="recent requests, newest last; --follow tails live")
    source_args(p)
    filter_args(p)
    p.add_argument("--since", help="only requests after this (1h, ISO-8601, Unix time)")
    p.add_argument("--failed", action="store_true", help="only unsuccessful requests (failed or cancelled)")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new requests (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=command(cmd_requests))

    cli_top.register(sub, source_args, command)

    p = sub.add_parser("export", help="stream rows as CSV or JSON lines (constant memory)")
    p.add_argument(
        "--db", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: the config's storage)"
    )
    p.add_argument("--config", metavar="PATH", help="config file")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--table", default="inference_metrics", help="table to export (default inference_metrics)")
    p.add_argument("--since", help="start (1h, ISO-8601, Unix time); default: everything")
    p.add_argument("--until", help="end; default: now")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=command(cmd_export))

    db = sub.add_parser("db", help="database health and pruning")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    p = dbsub.add_parser("stats", help="row counts, file and WAL size, oldest/newest, last retention run")
    source_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(cmd_db_stats))
    p = dbsub.add_parser("prune", help="apply the retention policy now (the file, not --url)")
    source_args(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument(
        "--vacuum", action="store_true", help="first rewrite the file with incremental auto-vacuum"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=command(cmd_db_prune))
    from proxy.cli import db_migrate

    db_migrate.register(dbsub)
