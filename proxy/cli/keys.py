"""``ollamon keys create | list | revoke | rotate | hash``: API keys, written to the database file.

Keys are stored only as hashes (storage/api_keys.py); ``create`` and ``rotate`` print the new key once,
alone on the last line, so a script can take it with ``tail -n 1``. Running proxies that share the file
pick changes up within ``auth.reload_interval_s`` (1 s).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.cli.source import CliError, command
from proxy.cli.terminal import format_table, visible
from proxy.config import load_config
from proxy.errors import CONFIG_ERRORS
from proxy.usage.keys import hash_key, key_prefix, new_key, parse_time
from storage.api_keys import insert_key, list_keys, revoke_key
from storage.errors import StorageError
from storage.reads import is_postgres_url
from storage.records import iso_utc

__all__ = ["register"]


def db_path(args: argparse.Namespace) -> Path | str:
    """``--db`` (a file or a ``postgresql://`` URL), else the config's storage (``storage.url`` when it is
    PostgreSQL, else ``storage.db``); created (and migrated) when it does not exist yet."""
    if args.db:
        return (
            str(args.db) if is_postgres_url(args.db) else Path(args.db.removeprefix("sqlite:")).expanduser()
        )
    try:
        storage = load_config(args.config).storage
    except CONFIG_ERRORS as exc:
        raise CliError(f"config error: {exc}", 2) from exc
    return storage.url if storage.postgres else storage.db_path


def _now() -> str:
    return iso_utc(time.time())


def _row(args: argparse.Namespace, key: str) -> dict[str, Any]:
    for n in ("rpm", "tpm", "concurrency"):
        if getattr(args, n) < 0:
            raise CliError(f"--{n} must be >= 0", 2)
    expires = None
    if args.expires:
        try:
            expires = parse_time(args.expires)
        except ValueError:
            raise CliError(f"--expires: expected an ISO date or date-time, got {args.expires!r}", 2) from None
    return {
        "id": "k_" + secrets.token_hex(6),
        "hash": hash_key(key),
        "prefix": key_prefix(key),
        "name": args.name,
        "owner": args.owner,
        "team": args.team,
        "models": list(args.models or []),
        "rpm": args.rpm,
        "tpm": args.tpm,
        "concurrency": args.concurrency,
        "admin": bool(args.admin),
        "expires_at": expires,
        "revoked_at": None,
        "created_at": _now(),
    }


def _insert(args: argparse.Namespace, row: dict[str, Any]) -> None:
    try:
        insert_key(db_path(args), row)
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc


def cmd_create(args: argparse.Namespace) -> int:
    key = new_key()
    row = _row(args, key)
    _insert(args, row)
    print(
        f"created key {row['id']} ({row['prefix']}...) named {visible(row['name'])}; it is shown only once:"
    )
    print(key)
    return 0


def _label(v: Any) -> str:
    return "-" if v in (None, 0, "", []) else visible(str(v))


def cmd_list(args: argparse.Namespace) -> int:
    try:
        rows = list_keys(db_path(args))
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc
    for r in rows:
        r.pop("hash")
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    headers = [
        "id",
        "prefix",
        "name",
        "owner",
        "team",
        "models",
        "rpm",
        "tpm",
        "conc",
        "admin",
        "expires",
        "revoked",
    ]
    table = [
        [
            r["id"],
            r["prefix"],
            visible(r["name"]),
            _label(r["owner"]),
            _label(r["team"]),
            _label(",".join(r["models"])),
            _label(r["rpm"]),
            _label(r["tpm"]),
            _label(r["concurrency"]),
            "yes" if r["admin"] else "-",
            _label(r["expires_at"]),
            _label(r["revoked_at"]),
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    return 0


def _revoke(args: argparse.Namespace, ident: str, at: str) -> dict[str, Any]:
    try:
        row = revoke_key(db_path(args), ident, at)
    except ValueError as exc:
        raise CliError(str(exc), 2) from exc
    except StorageError as exc:
        raise CliError(f"database error: {exc}") from exc
    if row is None:
        raise CliError(f"no key with id, prefix or name {ident!r}", 2)
    return row


def cmd_revoke(args: argparse.Namespace) -> int:
    row = _revoke(args, args.key, _now())
    print(f"revoked key {row['id']} ({row['prefix']}...) as of {row['revoked_at']}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    if args.grace < 0:
        raise CliError("--grace must be >= 0", 2)
    old = _revoke(args, args.key, iso_utc(time.time() + args.grace))
    key = new_key()
    row = dict(old, id="k_" + secrets.token_hex(6), hash=hash_key(key), prefix=key_prefix(key))
    row.update(revoked_at=None, created_at=_now())
    _insert(args, row)
    print(f"key {old['id']} is revoked as of {old['revoked_at']}; new key {row['id']} ({row['prefix']}...):")
    print(key)
    return 0


def cmd_hash(args: argparse.Namespace) -> int:
    key = args.key if args.key else sys.stdin.readline().strip()
    if not key:
        raise CliError("give the key as an argument or on standard input", 2)
    print(hash_key(key))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: the config's storage)"
    )
    p.add_argument("--config", metavar="PATH", help="config file (env OLLAMON_CONFIG; default ./config.yaml)")


def register(sub: Any) -> None:
    """Add this command's parsers to the ``ollamon`` subcommands."""
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, rotate, hash")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    p = ks.add_parser("create", help="create a key and print it once (last line)")
    p.add_argument("name")
    p.add_argument("--owner", help="user the key's requests are attributed to (default: the name)")
    p.add_argument("--team")
    p.add_argument("--models", nargs="+", metavar="GLOB", help="allowed model globs (default: any)")
    p.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    p.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    p.add_argument("--concurrency", type=int, default=0, help="inference requests in flight (0: no limit)")
    p.add_argument("--expires", metavar="DATE", help="ISO date or date-time (UTC unless given)")
    p.add_argument("--admin", action="store_true", help="may use model management routes")
    _common(p)
    p.set_defaults(func=command(cmd_create))
    p = ks.add_parser("list", help="keys with prefix, name, team, limits, expiry, revocation")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=command(cmd_list))
    p = ks.add_parser("revoke", help="revoke a key now (by id, prefix or name)")
    p.add_argument("key", metavar="KEY")
    _common(p)
    p.set_defaults(func=command(cmd_revoke))
    p = ks.add_parser("rotate", help="a new key with the same settings; the old one revoked (after --grace)")
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--grace", type=float, default=0.0, metavar="SECONDS", help="old key stays valid this long"
    )
    _common(p)
    p.set_defaults(func=command(cmd_rotate))
    p = ks.add_parser("hash", help="print a key's hash, for auth.keys in the config")
    p.add_argument("key", nargs="?", help="the key (default: read from standard input)")
    p.set_defaults(func=command(cmd_hash))
