"""API keys: the format, the hash that is stored, and the in-memory key ring the gate looks keys up in.

A key is ``olm_`` followed by 43 base62 characters (32 random bytes): ``olm_[0-9A-Za-z]{43}``, a prefix
secret scanners can match. Only ``sha256(key)`` is kept (docs/usage.md says why a plain fast hash is right
for 256-bit random keys). Keys come from two places: the database (``ollamon keys create``) and the
config's ``auth.keys`` (hashes only); the ring holds both, keyed by hash, and is swapped whole on reload.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.usage.identity import Caller, KeyLimits

__all__ = [
    "KEY_PATTERN",
    "KeyEntry",
    "KeyRing",
    "hash_key",
    "key_prefix",
    "model_allowed",
    "new_key",
    "parse_config_keys",
    "parse_time",
]

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # 62**43 > 2**256: every 32-byte value fits
KEY_PATTERN = re.compile(r"olm_[0-9A-Za-z]{43}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def new_key() -> str:
    """A fresh random key: ``olm_`` + 32 random bytes in base62."""
    n = int.from_bytes(secrets.token_bytes(32), "big")
    out = []
    for _ in range(_BODY_LEN):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "olm_" + "".join(reversed(out))


def hash_key(key: str) -> str:
    """What is stored for ``key``: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_prefix(key: str) -> str:
    """The first 8 characters, shown by ``keys list`` to tell keys apart (not enough to guess one)."""
    return key[:8]


def parse_time(text: str) -> str:
    """An ISO date or date-time (UTC when no zone) as ``YYYY-MM-DDTHH:MM:SSZ``; ValueError if not one."""
    value = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    return value.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def model_allowed(model: str, globs: tuple[str, ...]) -> bool:
    """Whether ``model`` matches one of ``globs`` (case-sensitive fnmatch; no globs allows every model).

    A name without a tag also matches as ``name:latest``, the name Ollama resolves it to.
    """
    if not globs:
        return True
    names = (model, f"{model}:latest") if ":" not in model else (model,)
    return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key as the gate sees it: its caller, and when it stops being valid (epoch seconds)."""

    caller: Caller
    expires_at: float | None = None
    revoked_at: float | None = None

    def refusal_reason(self, now: float) -> str | None:
        """``expired``/``revoked`` when the key may not be used at ``now``, else None."""
        if self.revoked_at is not None and now >= self.revoked_at:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return None


def entry_from_row(row: Mapping[str, Any]) -> tuple[str, KeyEntry]:
    """(hash, entry) from an ``api_keys`` row (storage/api_keys.py) or a parsed config key."""
    models = row.get("models") or ()
    caller = Caller(
        key_id=str(row["id"]),
        name=row.get("name"),
        user_id=row.get("owner") or row.get("name"),
        team=row.get("team"),
        admin=bool(row.get("admin")),
        models=tuple(models),
        limits=KeyLimits(
            int(row.get("rpm") or 0), int(row.get("tpm") or 0), int(row.get("concurrency") or 0)
        ),
    )
    return str(row["hash"]), KeyEntry(caller, _epoch(row.get("expires_at")), _epoch(row.get("revoked_at")))


class KeyRing:
    """Hash -> key, from config and database together; ``replace_db`` swaps the database part whole."""

    def __init__(self, config_rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self._config = dict(entry_from_row(r) for r in config_rows)
        self._all = dict(self._config)
        self._ids = {e.caller.key_id: e.caller for e in self._all.values()}
        self.db_keys = 0

    def replace_db(self, rows: Iterable[Mapping[str, Any]]) -> None:
        merged = dict(entry_from_row(r) for r in rows)
        self.db_keys = len(merged)
        merged.update(self._config)  # config wins: an operator's file is the stronger statement
        self._all = merged
        self._ids = {e.caller.key_id: e.caller for e in merged.values()}

    def by_id(self, key_id: str) -> Caller | None:
        return self._ids.get(key_id)

    def lookup(self, key: str) -> KeyEntry | None:
        return self._all.get(hash_key(key))

    def __len__(self) -> int:
        return len(self._all)


_CONFIG_FIELDS = {"name", "owner", "team", "models", "rpm", "tpm", "concurrency", "expires", "admin", "hash"}


def parse_config_keys(raw: Any) -> list[dict[str, Any]]:
    """Validate ``auth.keys`` (a list of mappings) into rows; ValueError names the entry and field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError("expected a list of keys")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"auth.keys[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with name and hash")
        unknown = set(item) - _CONFIG_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
        name, digest = item.get("name"), item.get("hash")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.name: required, a non-empty string")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"{where}.hash: expected 64 lowercase hex digits (ollamon keys hash)")
        if digest in seen:
            raise ValueError(f"{where}.hash: the same key appears twice")
        seen.add(digest)
        row: dict[str, Any] = {"id": f"cfg-{name}", "name": name, "hash": digest}
        for text in ("owner", "team"):
            v = item.get(text)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{where}.{text}: expected a string")
            row[text] = v
        models = item.get("models") or []
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}.models: expected a list of model globs")
        row["models"] = models
        for n in ("rpm", "tpm", "concurrency"):
            v = item.get(n, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.{n}: expected a whole number >= 0")
            row[n] = v
        admin = item.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{where}.admin: expected true or false")
        row["admin"] = admin
        expires = item.get("expires")
        try:
            row["expires_at"] = None if expires is None else parse_time(str(expires))
        except ValueError:
            raise ValueError(f"{where}.expires: expected an ISO date, got {expires!r}") from None
        rows.append(row)
    return rows
