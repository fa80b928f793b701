"""Where the CLI's reads come from: a running proxy's API (``--url``) or the database file (``--db``).

``fetch(args, endpoint, params)`` answers what ``GET /ollamon/api/<endpoint>`` would, either way: from the
file through the same storage read functions (``storage.reads.Reads``) the API ends in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from proxy.answers import BadParameter
from proxy.api.params import parse_int, parse_time, parse_window
from proxy.cli.terminal import visible
from proxy.config import load_config
from proxy.errors import CONFIG_ERRORS
from storage.browse import RequestQuery, decode_cursor
from storage.errors import StorageError
from storage.queries import Filters, QueryError
from storage.reads import Reads, is_postgres_url

__all__ = [
    "CliError",
    "command",
    "db_path",
    "fetch",
    "filter_args",
    "http_get",
    "http_json",
    "reads",
    "source_args",
]


class CliError(Exception):
    """Printed as ``ollamon: <message>`` with exit status ``status``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def command(handler: Any) -> Any:
    """``handler(args)`` as a subcommand: a ``CliError`` prints ``ollamon: <message>`` and exits with its
    status; a closed pipe (``ollamon stats | head``) ends quietly."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except CliError as exc:
            print(visible(f"ollamon: {exc}"), file=sys.stderr)
            return exc.status
        except BrokenPipeError:
            return 0

    return wrapped


def source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--db", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: the config's storage)"
    )
    g.add_argument(
        "--url", metavar="URL", help="read a running proxy's API instead, e.g. http://127.0.0.1:11435"
    )
    p.add_argument("--config", metavar="PATH", help="config file (env OLLAMON_CONFIG; default ./config.yaml)")


def filter_args(p: argparse.ArgumentParser, *, breakdown: bool = False) -> None:
    """The filters; with ``breakdown`` (``stats``), ``--upstream`` or ``--instance`` without a name, or
    ``--by``, break the summary down per upstream or instance instead (their value is then ``True``)."""
    p.add_argument("--model", help="only this model")
    p.add_argument("--endpoint", help="only this endpoint, e.g. /api/chat")
    p.add_argument("--user", help="only this user id")
    hosts = ("--upstream", "only this Ollama host (docs/upstreams.md)", "host")
    instances = ("--instance", "only records this ollamon instance wrote (server.instance)", "instance")
    for flag, text, row in (hosts, instances):
        if breakdown:
            p.add_argument(
                flag, metavar="NAME", nargs="?", const=True, help=f"{text}; alone, one row per {row}"
            )
        else:
            p.add_argument(flag, metavar="NAME", help=text)
    if breakdown:
        p.add_argument("--by", choices=["upstream", "instance"], help="one row per upstream or instance")


def db_path(args: argparse.Namespace) -> Path | str:
    """The database the arguments name: ``--db`` (a file, or a ``postgresql://`` URL), else the config's
    ``storage.url`` (env ``OLLAMON_DB_URL``) when it is PostgreSQL, else its ``storage.db`` file (which must
    exist: the CLI never creates an empty database to read)."""
    if getattr(args, "db", None):
        if is_postgres_url(args.db):
            return str(args.db)
        path = Path(args.db.removeprefix("sqlite:")).expanduser()
    else:
        try:
            storage = load_config(args.config).storage
        except CONFIG_ERRORS as exc:
            raise CliError(f"config error: {exc}", 2) from exc
        if storage.postgres:
            return storage.url
        path = storage.db_path
    if not path.is_file():
        raise CliError(f"no database at {path} (start the proxy once, or pass --db PATH)")
    return path


def reads(args: argparse.Namespace) -> Reads:
    """Storage's read functions over the database file the arguments name (it must exist)."""
    return Reads(db_path(args))


def http_get(url: str, endpoint: str, params: dict[str, str]) -> Any:
    """``GET /ollamon/api/<endpoint>?params`` of a running proxy, as JSON."""
    return http_json(url, f"/ollamon/api/{endpoint}", params)


def http_json(url: str, path: str, params: dict[str, str]) -> Any:
    """``GET <url><path>?params`` as JSON, with ``Authorization: Bearer $OLLAMON_ADMIN_TOKEN`` when that is set
    (the proxy then needs it on every ``/ollamon/api/*`` route)."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    full = f"{url.rstrip('/')}{path}" + (f"?{query}" if query else "")
    token = os.environ.get("OLLAMON_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(full, headers=headers), timeout=10) as resp:
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
    db = reads(args)
    now = time.time()
    names = ("model", "endpoint", "user", "upstream", "instance")
    f = Filters(*(params.get(n) for n in names))
    if endpoint == "summary":
        since, until = parse_window(params, now, 3600.0)
        exact = {"true": True, "false": False}.get(params.get("exact", "auto"))
        return db.summary(since, until, f, exact=exact, by=params.get("by"))
    if endpoint == "requests":
        rq = RequestQuery(
            filters=f,
            success={"true": True, "false": False}.get(params.get("success", "")),
            since=parse_time("since", params["since"], now) if "since" in params else None,
            limit=parse_int("limit", params.get("limit"), 50, 1, 1000),
            cursor=decode_cursor(params["cursor"]) if "cursor" in params else None,
        )
        return db.recent_requests(rq)
    if endpoint == "stats":
        return db.db_stats()
    if endpoint == "errors":
        since, until = parse_window(params, now, 86400.0)
        return db.errors(
            since, until, params.get("model"), parse_int("limit", params.get("limit"), 50, 1, 1000)
        )
    raise AssertionError(endpoint)


def fetch(args: argparse.Namespace, endpoint: str, params: dict[str, str]) -> Any:
    """What ``GET /ollamon/api/<endpoint>?params`` answers, from ``--url`` or from the file."""
    params = {k: v for k, v in params.items() if v is not None}
    try:
        if getattr(args, "url", None):
            return http_get(args.url, endpoint, params)
        return _local(args, endpoint, params)
    except BadParameter as exc:
        raise CliError(str(exc), 2) from exc
    except QueryError as exc:
        raise CliError(f"bad parameter {exc.param!r}: {exc.reason}", 2) from exc
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc
