"""The ``instance`` column (issue 16): every record names the ollamon instance that wrote it.

``server.instance`` (env ``OLLAMON_INSTANCE``; default ``<hostname>:<listen port>``) is validated at startup
and stamped by the writer on every inference and error record, before the database, Redis and the alert
engine see them. Several instances sharing one database are told apart by it: ``instance=`` filters the
summary, the request list and the CLI, and ``by=instance`` gives each one's figures. Checked through the real
proxy in front of the emulator (two proxies on one SQLite file), and at the writer on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.keys import REDIS_KEY, WRITER_KEY
from storage.browse import RequestQuery, recent_requests
from storage.postgres import PostgresStore
from storage.queries import Filters
from storage.records import ErrorRecord
from storage.sqlite import SQLiteStore
from storage.writer import Writer
from tests.fixtures.cli import ollamon
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.records import rec
from tests.polling import until

pytestmark = pytest.mark.timeout(120)


# -- the setting ----------------------------------------------------------------------------------


def test_the_instance_comes_from_the_file_the_environment_or_the_host(tmp_path: Path) -> None:
    assert load_config(None, env={}).server.instance_name == f"{socket.gethostname()}:11435"
    cfg = tmp_path / "config.yaml"
    cfg.write_text("server:\n  listen: 0.0.0.0:8080\n")
    assert load_config(cfg, env={}).server.instance_name == f"{socket.gethostname()}:8080"
    cfg.write_text("server:\n  instance: rack-2/ollamon-a\n")
    assert load_config(cfg, env={}).server.instance_name == "rack-2/ollamon-a"
    env = {"OLLAMON_INSTANCE": "from-env"}
    assert load_config(cfg, env=env).server.instance_name == "from-env"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("'   '", "must not be blank"),
        ("x" * 129, "at most 128 characters, got 129"),
        ('"a\\tb"', "printable"),
        ('" edge"', "without leading or trailing spaces"),
        ("42", "expected a string"),
    ],
)
def test_a_bad_instance_names_the_file_the_key_and_the_reason(
    tmp_path: Path, value: str, reason: str
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"server:\n  instance: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, env={})
    message = str(exc.value)
    assert str(cfg) in message and "server.instance" in message and reason in message, message


def test_a_bad_instance_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={"OLLAMON_INSTANCE": "bad\x00name"})
    assert "OLLAMON_INSTANCE" in str(exc.value) and "printable" in str(exc.value)


# -- through the proxy ----------------------------------------------------------------------------


async def send(url: str, n: int, *, fail: int = 0) -> None:
    """``n`` generates, the last ``fail`` of them answered 500 by the emulator."""
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            headers = {"X-Emulate": "error_status=500"} if i >= n - fail else {}
            async with session.post(
                f"{url}/api/generate",
                json={"model": "llama3.2", "prompt": "hi", "stream": False},
                headers=headers,
            ) as resp:
                await resp.read()
                assert resp.status == (500 if i >= n - fail else 200)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body


async def test_every_record_carries_the_configured_instance(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, server__instance="edge-1")
    await send(proxy.url, 4, fail=1)
    rows = await proxy.wait_rows(4)
    errors = await proxy.wait_rows(1, "error_metrics")
    assert [r["instance"] for r in rows] == ["edge-1"] * 4
    assert {r["instance"] for r in errors} == {"edge-1"}
    page = await get_json(f"{proxy.url}/ollamon/api/requests?instance=edge-1")
    assert len(page["requests"]) == 4 and {r["instance"] for r in page["requests"]} == {"edge-1"}
    assert (await get_json(f"{proxy.url}/ollamon/api/requests?instance=edge-2"))["requests"] == []


async def test_the_redis_view_carries_the_instance_too(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    proxy = await make_proxy(emulator.url, redis__url=redis_server.url, server__instance="edge-r")
    await send(proxy.url, 4)
    await proxy.wait_rows(4)
    view, writer = proxy.app[REDIS_KEY], proxy.app[WRITER_KEY]
    await until(
        lambda: (
            view.stats()["written_batches"] >= writer.stats()["batches"]
            and not view.stats()["pending_batches"]
        ),
        10,
        "Redis has every batch",
    )
    assert {r["instance"] for r in await view.recent(10)} == {"edge-r"}
    body = await get_json(f"{proxy.url}/ollamon/api/requests?instance=edge-r&limit=2")
    assert body["source"] == "redis"  # Redis holds more than 2 matching rows: it answers, as SQLite would
    direct = recent_requests(
        sqlite3.connect(proxy.db_path), RequestQuery(Filters(instance="edge-r"), limit=2)
    )
    assert body["requests"] == direct["requests"] and len(direct["requests"]) == 2
    body = await get_json(f"{proxy.url}/ollamon/api/requests?instance=edge-s&limit=2")
    assert body["source"] == "sqlite" and body["requests"] == []


async def test_without_a_setting_the_instance_is_the_host_and_the_listen_port(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url)  # listens on 127.0.0.1:0 (the tests' config)
    await send(proxy.url, 1)
    rows = await proxy.wait_rows(1)
    assert rows[0]["instance"] == f"{socket.gethostname()}:0"


async def test_two_instances_on_one_database_are_told_apart(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    db = tmp_path / "shared.db"
    east: ProxyHandle = await make_proxy(emulator.url, db=db, server__instance="east")
    west: ProxyHandle = await make_proxy(emulator.url, db=db, server__instance="west")
    await asyncio.gather(send(east.url, 4, fail=1), send(west.url, 2))
    rows = await east.wait_rows(6)
    mine = {name: [r for r in rows if r["instance"] == name] for name in ("east", "west")}
    assert (len(mine["east"]), len(mine["west"])) == (4, 2)

    # Either proxy answers for both: the breakdown, and each instance alone.
    body = await get_json(f"{west.url}/ollamon/api/summary?window=1h&by=instance")
    groups = {g["instance"]: g for g in body["groups"]}
    assert list(groups) == ["east", "west"]
    for name, want in mine.items():
        g = groups[name]
        failed = sum(1 for r in want if not r["success"])
        assert (g["requests"], g["failed"]) == (len(want), failed)
        assert g["error_rate"] == failed / len(want)
        assert g["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in want)
        alone = await get_json(f"{west.url}/ollamon/api/summary?window=1h&instance={name}")
        assert alone["filters"]["instance"] == name
        assert {k: alone["overall"][k] for k in ("requests", "failed", "ttft_ms_p50")} == {
            k: g[k] for k in ("requests", "failed", "ttft_ms_p50")
        }
    page = await get_json(f"{east.url}/ollamon/api/requests?instance=west&limit=10")
    assert sorted(r["request_id"] for r in page["requests"]) == sorted(r["request_id"] for r in mine["west"])

    # The CLI, on the file.
    r = await asyncio.to_thread(
        ollamon, "stats", "--db", str(db), "--instance", "west", "--json", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["overall"]["requests"] == 2
    r = await asyncio.to_thread(ollamon, "stats", "--db", str(db), "--by", "instance", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [(g["instance"], g["requests"]) for g in orjson.loads(r.stdout)["groups"]] == [
        ("east", 4),
        ("west", 2),
    ]
    r = await asyncio.to_thread(
        ollamon, "requests", "--db", str(db), "--instance", "east", "--json", "--limit", "50", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    listed = orjson.loads(r.stdout)["requests"]
    assert len(listed) == 4 and {x["instance"] for x in listed} == {"east"}


# -- at the writer, on both backends ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLiteStore | PostgresStore]:
    s: SQLiteStore | PostgresStore
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "w.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_url"), command_timeout_s=10)
    await s.open()
    yield s
    await s.close()


async def rows_of(store: SQLiteStore | PostgresStore, table: str) -> list[tuple[str, str | None]]:
    """(request_id, instance) of every row of ``table``, sorted."""
    sql = f"SELECT request_id, instance FROM {table} ORDER BY request_id"
    if isinstance(store, SQLiteStore):
        con = sqlite3.connect(store.path)
        try:
            return [(r[0], r[1]) for r in con.execute(sql)]
        finally:
            con.close()
    conn = await asyncpg.connect(store.url, timeout=10)
    try:
        return [(r[0], r[1]) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_the_writer_stamps_every_inference_and_error_row(store: SQLiteStore | PostgresStore) -> None:
    failed = rec(2, success=False, error_message="boom")
    failed.error = ErrorRecord(
        timestamp=failed.timestamp, request_id="req-2", error_type="upstream", error_message="x"
    )
    alone = ErrorRecord(
        timestamp=failed.timestamp, request_id="req-3", error_type="internal", error_message="y"
    )
    imported = rec(4, instance="elsewhere")  # a record that already names its instance keeps it
    writer = Writer(store, flush_interval_s=0.01, instance="node-7:11435")
    await writer.start()
    for item in (rec(1), failed, alone, imported):
        assert writer.submit(item)
    await writer.stop()
    assert await rows_of(store, "inference_metrics") == [
        ("req-1", "node-7:11435"),
        ("req-2", "node-7:11435"),
        ("req-4", "elsewhere"),
    ]
    assert await rows_of(store, "error_metrics") == [("req-2", "node-7:11435"), ("req-3", "node-7:11435")]
