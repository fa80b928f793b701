"""``ollamon stats | requests | top | export | db stats | db prune``: the analytics from a terminal.

Each command reads the database file directly, read-only (``--db``, else the config's ``storage.db``), or a
running proxy's API (``--url http://127.0.0.1:11435``); both give the same answers because both end in the
same storage.queries / storage.browse functions. ``db prune`` writes, so it only works on the file.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from storage.browse import RequestQuery, db_stats, decode_cursor, recent_requests
from storage.queries import Filters, QueryError, columns_of, summary
from storage.retention import AioExecutor, Retention, RetentionPolicy

from .api_params import parse_int, parse_time, parse_window
from .config import load_config
from .errors import ConfigError
from .http_json import BadParameter

__all__ = ["CliError", "fetch", "format_table", "register"]


class CliError(Exception):
    """Printed as ``ollamon: <message>`` with exit status ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--db", metavar="PATH", help="SQLite database file (default: the config's storage.db)")
    g.add_argument(
        "--url", metavar="URL", help="read a running proxy's API instead, e.g. http://127.0.0.1:11435"
    )
    p.add_argument("--config", metavar="PATH", help="config file (env OLLAMON_CONFIG; default ./config.yaml)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="only this model")
    p.add_argument("--endpoint", help="only this endpoint, e.g. /api/chat")
    p.add_argument("--user", help="only this user id")


def db_path(args: argparse.Namespace) -> Path:
    if getattr(args, "db", None):
        path = Path(args.db).expanduser()
    else:
        try:
            path = load_config(args.config).storage.db_path
        except ConfigError as exc:
            raise CliError(f"config error: {exc}", 2) from exc
    if not path.is_file():
        raise CliError(f"no database at {path} (start the proxy once, or pass --db PATH)")
    return path


def open_ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=5.0)
    conn.execute("PRAGMA query_only=ON")
    return conn


def _http(url: str, endpoint: str, params: dict[str, str]) -> Any:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    full = f"{url.rstrip('/')}/ollamon/api/{endpoint}" + (f"?{query}" if query else "")
    try:
        with urllib.request.urlopen(full, timeout=10) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read()).get("error", str(exc))
        except (orjson.JSONDecodeError, AttributeError):
            message = str(exc)
        raise CliError(f"{full}: {message}", 2 if exc.code == 400 else 1) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {full}: {exc}") from exc


def _local(args: argparse.Namespace, endpoint: str, params: dict[str, str]) -> Any:
    conn = open_ro(db_path(args))
    now = time.time()
    try:
        f = Filters(params.get("model"), params.get("endpoint"), params.get("user"))
        if endpoint == "summary":
            since, until = parse_window(params, now, 3600.0)
            exact = {"true": True, "false": False}.get(params.get("exact", "auto"))
            return summary(conn, since, until, f, exact=exact)
        if endpoint == "requests":
            rq = RequestQuery(
                filters=f,
                success={"true": True, "false": False}.get(params.get("success", "")),
                since=parse_time("since", params["since"], now) if "since" in params else None,
                limit=parse_int("limit", params.get("limit"), 50, 1, 1000),
                cursor=decode_cursor(params["cursor"]) if "cursor" in params else None,
            )
            return recent_requests(conn, rq)
        if endpoint == "stats":
            return db_stats(conn, db_path(args))
        raise AssertionError(endpoint)
    finally:
        conn.close()


def fetch(args: argparse.Namespace, endpoint: str, params: dict[str, str]) -> Any:
    """What ``GET /ollamon/api/<endpoint>?params`` answers, from ``--url`` or from the file."""
    params = {k: v for k, v in params.items() if v is not None}
    try:
        if getattr(args, "url", None):
            return _http(args.url, endpoint, params)
        return _local(args, endpoint, params)
    except BadParameter as exc:
        raise CliError(str(exc), 2) from exc
    except QueryError as exc:
        raise CliError(f"bad parameter {exc.param!r}: {exc.reason}", 2) from exc
    except sqlite3.Error as exc:
        raise CliError(f"database error: {exc}") from exc


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:,.2f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table (numbers right-aligned)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) for i in range(len(headers))
    ]
    lines = [
        "  ".join(
            h.ljust(w) if not n else h.rjust(w) for h, w, n in zip(headers, widths, numeric, strict=True)
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric, strict=True))
        )
    return "\n".join(lines)


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_stats(args: argparse.Namespace) -> int:
    params = {"since": args.since, "until": args.until, "model": args.model, "endpoint": args.endpoint}
    params |= {"user": args.user, "exact": args.exact}
    data = fetch(args, "summary", params)
    if args.json:
        _print_json(data)
        return 0
    models = data.get("models", [])
    headers = ["figure", "all", *(m["model"] or "(unknown)" for m in models)]
    rows = [[name, value, *(m.get(name) for m in models)] for name, value in data["overall"].items()]
    w = data["window"]
    print(
        f"{w['since']} .. {w['until']}  ({'exact' if data['exact'] else 'from rollups, percentiles within 1%'})"
    )
    print(format_table(headers, rows))
    res = [[k, v] for k, v in data.get("resources", {}).items()]
    if res:
        print()
        print(format_table(["resource", "value"], res))
    return 0


_REQUEST_COLUMNS = (
    ("timestamp", "time"),
    ("model_name", "model"),
    ("endpoint", "endpoint"),
    ("status_code", "status"),
    ("success", "ok"),
    ("response_time_ms", "ms"),
    ("ttft_ms", "ttft_ms"),
    ("completion_tokens", "tokens"),
    ("request_id", "request_id"),
)


def _request_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r.get(c) for c, _ in _REQUEST_COLUMNS] for r in rows]


def cmd_requests(args: argparse.Namespace) -> int:
    params = {"since": args.since, "model": args.model, "endpoint": args.endpoint, "user": args.user}
    params |= {"limit": str(args.limit), "success": "false" if args.failed else None}
    data = fetch(args, "requests", params)
    rows: list[dict[str, Any]] = data["requests"]
    if args.json and not args.follow:
        _print_json(data)
        return 0
    headers = [h for _, h in _REQUEST_COLUMNS]
    print(format_table(headers, _request_rows(list(reversed(rows)))), flush=True)
    if not args.follow:
        return 0
    seen = {(r["timestamp"], r["request_id"]) for r in rows}
    try:
        while True:
            time.sleep(args.interval)
            fresh = [
                r
                for r in fetch(args, "requests", params | {"limit": "200"})["requests"]
                if (r["timestamp"], r["request_id"]) not in seen
            ]
            for r in reversed(fresh):
                seen.add((r["timestamp"], r["request_id"]))
                print("  ".join(_fmt(v) for v in _request_rows([r])[0]), flush=True)
    except KeyboardInterrupt:
        return 0


def _export_rows(conn: sqlite3.Connection, table: str, since: float, until: float) -> Iterator[Sequence[Any]]:
    from storage.records import iso_utc

    cur = conn.execute(
        f"SELECT * FROM {table} WHERE timestamp >= ? AND timestamp < ? ORDER BY rowid",
        (iso_utc(since), iso_utc(until)),
    )
    yield [d[0] for d in cur.description]
    while chunk := cur.fetchmany(1000):
        yield from chunk


def cmd_export(args: argparse.Namespace) -> int:
    path = db_path(args)
    now = time.time()
    try:
        since = parse_time("since", args.since, now) if args.since else 0.0
        until = parse_time("until", args.until, now) if args.until else now + 86400
    except BadParameter as exc:
        raise CliError(str(exc), 2) from exc
    conn = open_ro(path)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        if "timestamp" not in columns_of(conn, args.table):
            raise CliError(f"--table {args.table}: no such table with a timestamp column", 2)
        rows = _export_rows(conn, args.table, since, until)
        names = list(next(rows))
        if args.format == "csv":
            w = csv.writer(out)
            w.writerow(names)
            for row in rows:
                w.writerow(["" if v is None else v for v in row])
        else:
            for row in rows:
                out.write(orjson.dumps(dict(zip(names, row, strict=True))).decode() + "\n")
        out.flush()
    finally:
        conn.close()
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_db_stats(args: argparse.Namespace) -> int:
    data = fetch(args, "stats", {})
    if args.json:
        _print_json(data)
        return 0
    facts = [[k, data.get(k)] for k in ("path", "file_bytes", "wal_bytes", "page_size", "page_count")]
    facts += [[k, data.get(k)] for k in ("freelist_pages", "auto_vacuum")]
    print(format_table(["", "value"], facts))
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
    print(f"last retention run: {run['finished_at'] + ' ' + str(run['deleted']) if run else 'never'}")
    return 0


async def _prune(path: Path, policy: RetentionPolicy, dry_run: bool, vacuum: bool) -> dict[str, Any]:
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=5000")
        retention = Retention(policy, AioExecutor(db), path)
        if vacuum and not dry_run:
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await db.execute("VACUUM")
        return await retention.run_once(dry_run=dry_run)
    finally:
        await db.close()


def cmd_db_prune(args: argparse.Namespace) -> int:
    if args.url:
        raise CliError("db prune works on the database file; pass --db (or none, for the config's)", 2)
    path = db_path(args)
    try:
        r = load_config(args.config).retention
    except ConfigError as exc:
        raise CliError(f"config error: {exc}", 2) from exc
    policy = RetentionPolicy(r.raw_days, r.system_days, r.rollup_days, r.batch_rows)
    result = asyncio.run(_prune(path, policy, args.dry_run, args.vacuum))
    if args.json:
        _print_json(result)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(format_table(["table", verb], sorted(result["deleted"].items())))
        if not args.dry_run:
            print(f"freed {result['freed_bytes']:,} bytes; longest statement {result['max_statement_ms']} ms")
    if result["error"]:
        print(f"ollamon: retention failed: {result['error']}", file=sys.stderr)
        return 1
    return 0


def _run(handler: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except CliError as exc:
            print(f"ollamon: {exc}", file=sys.stderr)
            return exc.status
        except BrokenPipeError:
            return 0

    return wrapped


def register(sub: Any) -> None:
    """Add the analytics subcommands to ``ollamon``'s subparsers."""
    from . import cli_top

    p = sub.add_parser("stats", help="performance summary over a window (a table, or --json)")
    _source_args(p)
    _filter_args(p)
    p.add_argument("--since", default="1h", help="start: a duration ago (1h), ISO-8601 or Unix time")
    p.add_argument("--until", help="end (default now)")
    p.add_argument(
        "--exact", choices=["auto", "true", "false"], help="force raw rows (true) or rollups (false)"
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=_run(cmd_stats))

    p = sub.add_parser("requests", help="recent requests, newest last; --follow tails live")
    _source_args(p)
    _filter_args(p)
    p.add_argument("--since", help="only requests after this (1h, ISO-8601, Unix time)")
    p.add_argument("--failed", action="store_true", help="only unsuccessful requests (failed or cancelled)")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new requests (Ctrl-C stops)")
    p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=_run(cmd_requests))

    cli_top.register(sub, _source_args, _run)

    p = sub.add_parser("export", help="stream rows as CSV or JSON lines (constant memory)")
    p.add_argument("--db", metavar="PATH", help="SQLite database file (default: the config's storage.db)")
    p.add_argument("--config", metavar="PATH", help="config file")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("--table", default="inference_metrics", help="table to export (default inference_metrics)")
    p.add_argument("--since", help="start (1h, ISO-8601, Unix time); default: everything")
    p.add_argument("--until", help="end; default: now")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=_run(cmd_export))

    db = sub.add_parser("db", help="database health and pruning")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    p = dbsub.add_parser("stats", help="row counts, file and WAL size, oldest/newest, last retention run")
    _source_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_db_stats))
    p = dbsub.add_parser("prune", help="apply the retention policy now (the file, not --url)")
    _source_args(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument(
        "--vacuum", action="store_true", help="first rewrite the file with incremental auto-vacuum"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run(cmd_db_prune))
