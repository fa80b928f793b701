"""``ollamon conversations [--since 24h] [--model M] [--limit N] [--url URL | --db PATH] [--json] [ID]``.

Without ``ID``: the conversations active in the window, most recent first, and the estimated prompt-cache
reuse per model. With ``ID``: that conversation's requests in order. Reads a running ollamon's API (``--url``)
or the database file (read-only). Every cell goes through proxy/cli/terminal.py: ids come from clients.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from proxy.answers import BadParameter
from proxy.api.params import parse_duration, parse_model
from proxy.cli.terminal import format_table, json_text, visible
from proxy.errors import CONFIG_ERRORS
from storage.errors import StorageError
from storage.reads import Reads, is_postgres_url

__all__ = ["register"]


class _ReadError(Exception):
    """The API or the database could not answer; the message says which and why."""


def register(sub: Any) -> None:
    """Add the ``conversations`` subcommand to ``ollamon``'s subparsers."""
    p = sub.add_parser("conversations", help="list conversations, or show one conversation's turns")
    p.add_argument("id", nargs="?", metavar="ID", help="show this conversation's requests in order")
    p.add_argument("--since", default="24h", help="window to list, a duration like 1h or 7d (default 24h)")
    p.add_argument("--model", help="only conversations with a request to this model")
    p.add_argument("--limit", type=int, default=50, help="at most this many conversations (default 50)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", metavar="URL", help="ask a running ollamon, e.g. http://127.0.0.1:11435")
    src.add_argument(
        "--db", metavar="PATH|URL", help="read this SQLite file or postgresql:// URL (default: the config's)"
    )
    p.add_argument("--config", metavar="PATH", help="config file used to find the database")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _fetch(url: str, path: str, query: dict[str, Any]) -> dict[str, Any] | None:
    full = f"{url.rstrip('/')}/ollamon/api/conversations{path}"
    if query:
        full += "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(full, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise _ReadError(f"{full}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _ReadError(f"{full}: {exc}") from exc


def _from_db(
    args: argparse.Namespace, since: float, until: float, model: str | None
) -> dict[str, Any] | None:
    db = args.db
    if db is None:
        from proxy.config import load_config

        storage = load_config(args.config).storage
        db = storage.url if storage.postgres else str(storage.db_path)
    if not is_postgres_url(db) and not Path(db).exists():
        raise _ReadError(f"{db}: no such database")
    reads = Reads(db)
    try:
        if args.id is not None:
            return reads.conversation(args.id)
        return reads.conversations(since, until, model, args.limit)
    except StorageError as exc:
        raise _ReadError(
            f"cannot read conversations ({exc}); is it a database of this ollamon version?"
        ) from exc


def run(args: argparse.Namespace) -> int:
    try:
        window = parse_duration("since", args.since)
        model = parse_model(args.model)
        if not 1 <= args.limit <= 1000:
            raise BadParameter("limit", "must be 1..1000")
        until = time.time()
        if args.url:
            if args.id is not None:
                body = _fetch(args.url, "/" + urllib.parse.quote(args.id, safe=""), {})
            else:
                query = {
                    "window": args.since,
                    "limit": args.limit,
                    **({"model": args.model} if model else {}),
                }
                body = _fetch(args.url, "", query)
        else:
            body = _from_db(args, until - window, until, model)
    except BadParameter as exc:
        print(visible(f"ollamon: {exc}"), file=sys.stderr)
        return 2
    except CONFIG_ERRORS as exc:
        print(visible(f"ollamon: config error: {exc}"), file=sys.stderr)
        return 2
    except _ReadError as exc:
        print(visible(f"ollamon: {exc}"), file=sys.stderr)
        return 1
    if body is None:
        print(visible(f"ollamon: no such conversation: {args.id}"), file=sys.stderr)
        return 1
    if args.json:
        print(json_text(body, indent=True))
    elif args.id is not None:
        print(_detail(body))
    else:
        print(_listing(body))
    return 0


def _ratio(value: Any) -> str | None:
    return None if value is None else f"{value * 100:.0f}%"


def _listing(body: dict[str, Any]) -> str:
    rows = [
        [
            c["conversation_id"],
            c["model_name"],
            c["turns"],
            c["request_count"],
            c["prompt_tokens"],
            c["completion_tokens"],
            _ratio(c["cache_reuse_ratio"]),
            c["response_time_ms_mean"],
            c["last_at"],
        ]
        for c in body["conversations"]
    ]
    if not rows:
        out = "no conversations in the window"
    else:
        out = format_table(
            ("conversation", "model", "turns", "requests", "prompt", "completion", "cache~", "ms", "last"),
            rows,
        )
    reuse = body.get("cache_reuse_by_model") or {}
    if reuse:
        table = format_table(
            ("model", "requests", "cached~", "new~", "reuse~"),
            [
                [
                    m,
                    r["requests"],
                    r["prompt_cached_tokens"],
                    r["prompt_new_tokens"],
                    _ratio(r["cache_reuse_ratio"]),
                ]
                for m, r in reuse.items()
            ],
        )
        out += "\n\nprompt-cache reuse per model (~ estimated, docs/conversations.md)\n" + table
    return out


def _detail(body: dict[str, Any]) -> str:
    head = visible(
        f"conversation {body['conversation_id']}: {body['request_count']} request(s), "
        f"{body['turns'] or 0} turn(s), models {', '.join(body['models'])}, "
        f"cache reuse~ {_ratio(body['cache_reuse_ratio']) or 'unknown'}"
    )
    rows = [
        [
            t["timestamp"],
            t["turn"],
            t["model_name"],
            t["prompt_tokens"],
            t["prompt_cached_tokens"],
            t["completion_tokens"],
            t["thinking_tokens"],
            t["ttft_ms"],
            t["response_time_ms"],
            "ok" if t["success"] else "error",
        ]
        for t in body["requests"]
    ]
    table = format_table(
        ("time", "turn", "model", "prompt", "cached~", "completion", "thinking~", "ttft ms", "ms", "status"),
        rows,
    )
    return head + "\n" + table
