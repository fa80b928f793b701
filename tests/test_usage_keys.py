"""API keys: format, hashing, model globs, config keys, and ``ollamon keys`` against a real database file."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.usage.keys import KEY_PATTERN, KeyRing, hash_key, model_allowed, new_key, parse_config_keys
from storage.api_keys import load_keys


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
    )


def test_key_format_and_hash() -> None:
    keys = {new_key() for _ in range(200)}
    assert len(keys) == 200
    assert all(KEY_PATTERN.fullmatch(k) for k in keys)
    k = next(iter(keys))
    assert hash_key(k) == hashlib.sha256(k.encode()).hexdigest()
    # The regex a secret scanner would use finds a key inside other text.
    assert KEY_PATTERN.search(f"export OLLAMA_API_KEY={k}\n").group(0) == k  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("model", "globs", "ok"),
    [
        ("llama3.2", (), True),
        ("llama3.2", ("llama3*",), True),
        ("llama3.2", ("llama3.2:latest",), True),  # a bare name is Ollama's name:latest
        ("llama3.2:1b", ("llama3.2:latest",), False),
        ("qwen3:0.6b", ("llama3*", "qwen3:*"), True),
        ("Llama3", ("llama3*",), False),
        ("gpt-oss:120b-cloud", ("*-cloud",), True),
    ],
)
def test_model_globs(model: str, globs: tuple[str, ...], ok: bool) -> None:
    assert model_allowed(model, globs) is ok


def test_config_keys_parse_and_reject() -> None:
    h = hash_key(new_key())
    rows = parse_config_keys(
        [{"name": "ci", "hash": h, "models": "llama3*", "rpm": 5, "expires": "2030-01-02"}]
    )
    assert (
        rows[0]["id"] == "cfg-ci"
        and rows[0]["models"] == ["llama3*"]
        and rows[0]["expires_at"] == "2030-01-02T00:00:00Z"
    )
    bad = [
        ([{"name": "x", "hash": "olm_raw"}], "auth.keys[0].hash"),
        ([{"name": "", "hash": h}], "auth.keys[0].name"),
        ([{"name": "x", "hash": h, "rpm": -1}], "auth.keys[0].rpm"),
        ([{"name": "x", "hash": h, "expires": "soon"}], "auth.keys[0].expires"),
        ([{"name": "x", "hash": h, "key": "olm_x"}], "unknown field"),
        ([{"name": "x", "hash": h}, {"name": "y", "hash": h}], "twice"),
        ({"name": "x"}, "a list"),
    ]
    for raw, needle in bad:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            parse_config_keys(raw)


def test_config_validation(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("auth:\n  mode: off\n")  # YAML's bare off is false: still "off"
    assert load_config(f, env={}).auth.mode_name == "off"
    f.write_text("auth:\n  mode: sometimes\n")
    with pytest.raises(ConfigError, match=r"auth\.mode"):
        load_config(f, env={})
    f.write_text("auth:\n  keys:\n    - {name: a, hash: nothex}\n")
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].hash"):
        load_config(f, env={})
    f.write_text("limits:\n  redis_timeout_ms: 0\n")
    with pytest.raises(ConfigError, match=r"limits\.redis_timeout_ms"):
        load_config(f, env={})


def test_ring_expiry_and_config_precedence() -> None:
    key = new_key()
    ring = KeyRing(parse_config_keys([{"name": "cfg", "hash": hash_key(key), "team": "ops"}]))
    row = {"id": "k_1", "hash": hash_key(key), "name": "db", "team": "x", "models": [], "revoked_at": None}
    ring.replace_db([row])
    entry = ring.lookup(key)
    assert entry is not None and entry.caller.key_id == "cfg-cfg"  # the config's entry wins
    other = new_key()
    ring.replace_db([{**row, "hash": hash_key(other), "expires_at": "2001-01-01T00:00:00Z"}])
    e2 = ring.lookup(other)
    assert e2 is not None and e2.refusal_reason(time.time()) == "expired"
    assert ring.lookup(new_key()) is None


def test_cli_create_list_revoke_rotate(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    out = cli(
        "create", "ci", "--team", "research", "--models", "llama3*", "qwen3:*", "--rpm", "7", "--db", str(db)
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key)
    listed = cli("list", "--json", "--db", str(db))
    rows = orjson.loads(listed.stdout)
    assert len(rows) == 1 and "hash" not in rows[0]
    r = rows[0]
    assert (r["name"], r["team"], r["models"], r["rpm"], r["prefix"]) == (
        "ci",
        "research",
        ["llama3*", "qwen3:*"],
        7,
        key[:8],
    )
    table = cli("list", "--db", str(db)).stdout
    assert key[:8] in table and key not in table and "research" in table
    # rotate with a grace: the old key stays valid for it, the new one has the same settings.
    out = cli("rotate", "ci", "--grace", "3600", "--db", str(db))
    assert out.returncode == 0, out.stderr
    new = out.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.fullmatch(new) and new != key
    loaded = {row["hash"]: row for row in load_keys(db)}
    old_row, new_row = loaded[hash_key(key)], loaded[hash_key(new)]
    assert old_row["revoked_at"] > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3000))
    assert (
        new_row["revoked_at"] is None and new_row["models"] == ["llama3*", "qwen3:*"] and new_row["rpm"] == 7
    )
    out = cli("revoke", new_row["id"], "--db", str(db))
    assert out.returncode == 0 and "revoked" in out.stdout
    assert load_keys(db)[1]["revoked_at"] is not None
    bad = cli("revoke", "olm_none", "--db", str(db))
    assert bad.returncode == 2 and "no key" in bad.stderr
    assert cli("create", "x", "--expires", "someday", "--db", str(db)).returncode == 2
    # Only hashes: neither raw key is anywhere in the file (nor its WAL).
    for f in tmp_path.iterdir():
        data = f.read_bytes()
        assert key.encode() not in data and new.encode() not in data


def test_cli_hash_matches(tmp_path: Path) -> None:
    key = new_key()
    assert cli("hash", stdin=key + "\n").stdout.strip() == hash_key(key)
    assert cli("hash", key).stdout.strip() == hash_key(key)


def test_load_keys_before_the_table_exists(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    assert load_keys(db) == []
