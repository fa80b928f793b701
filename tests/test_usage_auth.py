"""Identity and access through a real proxy: keys from the database and the config, auth.mode, stripping
the key upstream, admin-only model management, revocation across instances, and the official clients."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web

from proxy.api.auth import GATE_KEY
from proxy.usage.keys import hash_key, new_key
from tests.fixtures.proxy import MakeProxy, ProxyHandle

pytestmark = pytest.mark.timeout(120)

GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``ollamon keys ...`` as a user runs it (a separate process)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create(db: Path, name: str, *extra: str) -> str:
    out = cli("create", name, "--db", str(db), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


async def post(url: str, body: Any, key: str | None = None, **headers: str) -> tuple[int, Any, Any]:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None), r.headers


@pytest.fixture
async def echo() -> Any:
    """A raw upstream that answers like Ollama and keeps every request's headers (ground truth)."""
    seen: list[dict[str, str]] = []

    async def any_route(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.json_response({"model": "m", "response": "ok", "done": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_route)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_required_mode_refuses_and_records_without_the_key(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    db = tmp_path / "p.db"
    key = create(db, "ci", "--team", "research", "--owner", "alice", "--models", "llama3*")
    p = await make_proxy(emulator.url, db=db, auth__mode="required")
    gen = f"{p.url}/api/generate"
    status, body, _ = await post(gen, GEN)
    assert status == 401 and body == {
        "error": "ollamon: an API key is required (Authorization: Bearer olm_...)"
    }
    bogus = new_key()
    status, body, _ = await post(gen, GEN, bogus)
    assert (status, body) == (401, {"error": "ollamon: unknown API key"})
    status, body, _ = await post(gen, {**GEN, "model": "qwen3:0.6b"}, key)
    assert status == 403 and body == {"error": "ollamon: this API key may not use model 'qwen3:0.6b'"}
    status, body, _ = await post(gen, GEN, key)
    assert status == 200 and body["done"] is True
    rows = await p.wait_rows(4)
    assert [r["status_code"] for r in rows] == [401, 401, 403, 200]
    ok = rows[3]
    assert ok["api_key_id"].startswith("k_") and ok["team"] == "research" and ok["user_id"] == "alice"
    assert rows[2]["api_key_id"] == ok["api_key_id"]
    assert rows[0]["api_key_id"] is None and rows[1]["api_key_id"] is None
    errors = await p.wait_rows(3, "error_metrics")
    assert [e["error_type"] for e in errors] == ["unauthorized", "unauthorized", "forbidden"]
    assert errors[2]["api_key_id"] == ok["api_key_id"] and errors[2]["team"] == "research"
    async with aiohttp.ClientSession() as s, s.get(f"{p.url}/ollamon/health") as r:
        auth = (await r.json())["auth"]
    assert auth["mode"] == "required" and auth["keys"] == 1
    assert auth["refused"] == {"unauthorized": 2, "forbidden": 1}


async def test_key_is_stripped_upstream_unless_forwarded(
    echo: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    url, seen = echo
    db = tmp_path / "p.db"
    key = create(db, "ci")
    stripped = await make_proxy(url, db=db, auth__mode="required")
    kept = await make_proxy(url, db=db, auth__mode="required", auth__forward_key=True)
    off = await make_proxy(url, db=tmp_path / "off.db")
    assert (await post(f"{stripped.url}/api/generate", GEN, key))[0] == 200
    assert (await post(f"{kept.url}/api/generate", GEN, key))[0] == 200
    assert (await post(f"{off.url}/api/generate", GEN, "not-an-ollamon-key"))[0] == 200
    auth = [h.get("Authorization") for h in seen]
    assert auth == [None, f"Bearer {key}", "Bearer not-an-ollamon-key"]


async def test_optional_mode(emulator: Any, make_proxy: MakeProxy, tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    key = create(db, "ci", "--team", "t1")
    p = await make_proxy(emulator.url, db=db, auth__mode="optional")
    gen = f"{p.url}/api/generate"
    assert (await post(gen, GEN, None, **{"X-User-Id": "bob"}))[0] == 200  # anonymous passes
    assert (await post(gen, GEN, "ollama"))[0] == 200  # not an olm_ key (OpenAI SDK dummy): anonymous
    assert (await post(gen, GEN, new_key()))[0] == 401  # an olm_ key that is not known
    assert (await post(gen, GEN, key))[0] == 200
    rows = await p.wait_rows(4)
    assert [(r["user_id"], r["team"]) for r in rows] == [
        ("bob", None),
        (None, None),
        (None, None),
        ("ci", "t1"),
    ]


async def test_config_keys_and_admin_only_management(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    user, admin = new_key(), new_key()
    keys = [
        {"name": "user", "hash": hash_key(user), "team": "a"},
        {"name": "ops", "hash": hash_key(admin), "admin": True, "expires": "2999-01-01"},
        {"name": "old", "hash": hash_key("olm_" + "x" * 43), "expires": "2001-01-01"},
    ]
    p = await make_proxy(emulator.url, auth__mode="required", auth__keys=keys, auth__management="admin")
    pull = {"model": "llama3.2", "stream": False}
    status, body, _ = await post(f"{p.url}/api/pull", pull, user)
    assert status == 403 and body == {"error": "ollamon: /api/pull needs an admin API key"}
    assert (await post(f"{p.url}/api/pull", pull, admin))[0] == 200
    status, body, _ = await post(f"{p.url}/api/generate", GEN, "olm_" + "x" * 43)
    assert status == 401 and body == {"error": "ollamon: API key 'old' is expired"}
    rows = await p.wait_rows(1)
    assert rows[0]["status_code"] == 401
    errors = await p.wait_rows(2, "error_metrics")
    pulled = [e for e in errors if e["endpoint"] == "/api/pull"]
    assert (
        len(pulled) == 1 and pulled[0]["error_type"] == "forbidden" and pulled[0]["api_key_id"] == "cfg-user"
    )


async def test_revoked_key_refused_within_a_second_everywhere_and_never_stored(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture, redis_server: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "shared.db"
    key = create(db, "leaky", "--rpm", "1000")
    kw = {"db": db, "auth__mode": "required", "redis__url": redis_server.url}
    a, b = await make_proxy(emulator.url, **kw), await make_proxy(emulator.url, **kw)
    for p in (a, b):
        assert (await post(f"{p.url}/api/generate", GEN, key))[0] == 200
    out = cli("revoke", "leaky", "--db", str(db))
    assert out.returncode == 0, out.stderr
    for p in (a, b):
        codes: list[int] = []

        async def refused(p: ProxyHandle = p, codes: list[int] = codes) -> bool:
            codes.append((await post(f"{p.url}/api/generate", GEN, key))[0])
            return codes[-1] == 401

        await until_async(refused, within=3.0)
    await a.wait_rows(3)
    needle = key.encode()
    files = await asyncio.to_thread(lambda: {f: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()})
    assert any(f.name.endswith("-wal") for f in files), "no WAL to check"
    for f, data in files.items():
        assert needle not in data, f
    import redis

    r = redis.Redis.from_url(redis_server.url)
    try:
        names = r.keys("*")
        assert names, "the limiter wrote nothing to Redis"
        for name in names:
            assert needle not in name
            assert all(needle not in v for v in redis_values(r, name)), name
    finally:
        r.close()
    assert key not in caplog.text


def redis_values(r: Any, name: bytes) -> list[bytes]:
    """Every value stored under ``name``, whatever its type."""
    kind = r.type(name).decode()
    if kind == "string":
        return [r.get(name)]
    if kind == "list":
        return list(r.lrange(name, 0, -1))
    if kind == "hash":
        return [x for kv in r.hgetall(name).items() for x in kv]
    if kind == "set":
        return list(r.smembers(name))
    if kind == "zset":
        return list(r.zrange(name, 0, -1))
    if kind == "stream":
        return [repr(e).encode() for e in r.xrange(name)]
    raise AssertionError(f"unexpected Redis type {kind} for {name!r}")


async def until_async(predicate: Any, within: float) -> None:
    import time

    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, f"not true within {within} s"


async def test_official_clients_are_attributed(emulator: Any, make_proxy: MakeProxy, tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    okey = create(db, "ollama-py", "--team", "py")
    akey = create(db, "openai-sdk", "--team", "oai")
    p = await make_proxy(emulator.url, db=db, auth__mode="required")
    os.environ["OLLAMA_API_KEY"] = okey
    try:
        client = ollama.AsyncClient(host=p.url)  # reads OLLAMA_API_KEY when built: no code change
    finally:
        del os.environ["OLLAMA_API_KEY"]
    await client.generate(model="llama3.2", prompt="hi")
    await client._client.aclose()
    async with openai.AsyncOpenAI(base_url=p.url + "/v1", api_key=akey, max_retries=0) as oai:
        await oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    rows = await p.wait_rows(2)
    by_team = {r["team"]: r for r in rows}
    assert set(by_team) == {"py", "oai"}
    assert by_team["py"]["user_id"] == "ollama-py" and by_team["py"]["status_code"] == 200
    assert by_team["oai"]["user_id"] == "openai-sdk" and by_team["oai"]["endpoint"] == "/v1/chat/completions"
    assert by_team["py"]["api_key_id"] != by_team["oai"]["api_key_id"]


async def test_off_passes_authorization_untouched(echo: Any, make_proxy: MakeProxy) -> None:
    url, seen = echo
    p = await make_proxy(url)
    key = new_key()
    assert (await post(f"{p.url}/api/pull", {"model": "x"}, key))[0] == 200
    assert seen[0]["Authorization"] == f"Bearer {key}"
    assert p.app[GATE_KEY].active is False


async def test_model_limited_key_with_a_large_body(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """Over the 64 KiB small-body size the model is still read (whole body up to the inspect limit)."""
    db = tmp_path / "p.db"
    key = create(db, "big", "--models", "llama3*")
    p = await make_proxy(emulator.url, db=db, auth__mode="required")
    big = "word " * 40_000  # ~200 KB
    status, body, _ = await post(f"{p.url}/api/generate", {**GEN, "prompt": big}, key)
    assert status == 200 and body["done"] is True
    status, body, _ = await post(f"{p.url}/api/generate", {**GEN, "model": "qwen3:0.6b", "prompt": big}, key)
    assert status == 403

    async def chunks() -> Any:
        yield b'{"model": "llama3.2", "prompt": "hi", "stream": false}'

    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{p.url}/api/generate", data=chunks(), headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 403  # chunked: the model cannot be read before forwarding, so it is refused
        assert (await r.json())["error"].startswith("ollamon: this API key is limited to some models")
    rows = await p.wait_rows(3)
    assert [r["status_code"] for r in rows] == [200, 403, 403]
    assert rows[0]["prompt_length"] is not None
