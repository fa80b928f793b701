"""Storage faults made for real against the running proxy: a database locked by another process, a full
database, a client's out-of-range numbers, and a kill -9 in the middle of a burst.

Each checks what an operator sees (/ollamon/health, /ollamon/ready, the log of the next start) and that the
records add up once the fault clears: rows written + records dropped = requests sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.keys import STORE_KEY
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.fixtures.serve import serve_subprocess

BODY = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with s.get(url) as r:
        return r.status, await r.json()


async def _send(s: aiohttp.ClientSession, proxy: ProxyHandle, n: int) -> None:
    for _ in range(n):
        async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
            await r.read()
            assert r.status == 200


async def _until_health(
    s: aiohttp.ClientSession, proxy: ProxyHandle, key: str, value: Any, within_s: float = 15.0
) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        _, body = await _get(s, f"{proxy.url}/ollamon/health")
        if body.get(key) == value:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"health never had {key}={value!r}; last: {body}")
        await asyncio.sleep(0.1)


def _epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


async def test_locked_database_makes_health_degraded_and_ready_503_and_loses_nothing(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    """Another process holds BEGIN EXCLUSIVE: reads still work, so only the writer's failures can tell."""
    proxy = await make_proxy(emulator.url, storage__busy_timeout_ms=200, sampling__enabled=False)
    other = sqlite3.connect(proxy.db_path, isolation_level=None, check_same_thread=False)
    async with aiohttp.ClientSession() as s:
        try:
            await _send(s, proxy, 5)
            await proxy.wait_rows(5)
            assert (await _get(s, f"{proxy.url}/ollamon/ready"))[0] == 200
            locked_at = time.time()
            await asyncio.to_thread(other.execute, "BEGIN EXCLUSIVE")
            await _send(s, proxy, 20)
            health = await _until_health(s, proxy, "db", "write failing: database is locked")
            assert health["status"] == "degraded"
            err = health["writer"]["last_error"]
            assert "database is locked" in err["message"]
            assert locked_at - 0.5 <= _epoch(health["writer"]["failing_since"]) <= _epoch(err["at"])
            assert _epoch(err["at"]) <= time.time() + 0.5
            status, ready = await _get(s, f"{proxy.url}/ollamon/ready")
            assert status == 503 and ready["status"] == "not ready"
            assert ready["reasons"] == ["database: write failing: database is locked"]
            await _send(s, proxy, 10)  # still answered while the database is locked
        finally:
            await asyncio.to_thread(other.execute, "COMMIT")
            other.close()
        health = await _until_health(s, proxy, "db", "ok")
        assert health["writer"]["last_error"] is None and health["writer"]["write_failing"] is False
        assert health["writer"]["last_outage"]["cause"] == "database is locked"
        assert (await _get(s, f"{proxy.url}/ollamon/ready"))[0] == 200
    rows = await proxy.wait_rows(35)
    assert len(rows) + proxy.writer_stats["dropped"] == 35
    assert proxy.writer_stats["dropped"] == 0 and proxy.writer_stats["lost"] == 0


async def test_full_database_makes_health_degraded_then_every_record_is_written(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    """SQLITE_FULL for real: the database may not grow (max_page_count, which SQLite keeps per connection,
    set on the writer's own connection). Requests keep working; records wait in the queue."""
    proxy = await make_proxy(emulator.url, sampling__enabled=False)
    conn = proxy.app[STORE_KEY]._writer_conn()
    async with aiohttp.ClientSession() as s:
        await _send(s, proxy, 3)
        await proxy.wait_rows(3)
        (pages,) = await (await conn.execute("PRAGMA page_count")).fetchone()
        await conn.execute(f"PRAGMA max_page_count={pages}")
        try:
            await _send(s, proxy, 40)
            health = await _until_health(s, proxy, "db", "write failing: database or disk is full")
            assert health["status"] == "degraded" and health["queue_depth"] + health["writer"]["in_hand"] > 0
            status, ready = await _get(s, f"{proxy.url}/ollamon/ready")
            assert status == 503 and "database or disk is full" in ready["reasons"][0]
        finally:
            await conn.execute("PRAGMA max_page_count=1073741823")
        await _until_health(s, proxy, "db", "ok")
    rows = await proxy.wait_rows(43)
    stats = proxy.writer_stats
    assert len(rows) + stats["dropped"] == 43 and stats["lost"] == 0
    assert len({r["request_id"] for r in rows}) == len(rows)


async def test_client_numbers_beyond_64_bits_never_cost_the_row(emulator: Any, make_proxy: MakeProxy) -> None:
    """Ollama answers a request with "seed": 10**30; the proxy must record it. The columns that cannot hold
    the value are NULL and metadata keeps its text."""
    proxy = await make_proxy(emulator.url, sampling__enabled=False)
    native = {
        **BODY,
        "options": {"num_predict": 2, "seed": 10**30, "top_k": 2**64, "num_ctx": 2**63, "top_p": 0.5},
    }
    v1 = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "x"}],
        "seed": 2**63,  # read as an integer (orjson takes 64 bits unsigned), beyond what SQLite holds
        "max_tokens": 3,
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/api/generate", json=native) as r:
            await r.read()
            native_status = r.status
        async with s.post(f"{proxy.url}/v1/chat/completions", json=v1) as r:
            await r.read()
            v1_status = r.status
    rows = await proxy.wait_rows(2)
    gen, chat = rows
    assert (gen["status_code"], chat["status_code"]) == (native_status, v1_status)
    assert gen["seed"] is None and gen["top_k"] is None and gen["num_ctx"] is None and gen["top_p"] == 0.5
    kept = json.loads(gen["metadata"])["out_of_range"]
    # orjson reads integers beyond 64 bits as floats, so the text is that float's integer value.
    assert float(kept["seed"]) == 1e30 and float(kept["top_k"]) == 2.0**64 and int(kept["num_ctx"]) == 2**63
    assert chat["seed"] is None and chat["max_tokens"] == 3
    assert json.loads(chat["metadata"])["out_of_range"] == {"seed": "9223372036854775808"}
    assert proxy.rows("error_metrics", "error_type = 'internal'") == []
    assert proxy.writer_stats["rejected"] == 0


async def test_ready_is_503_while_the_upstream_is_down(make_proxy: MakeProxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy = await make_proxy(dead, sampling__enabled=False)
    async with aiohttp.ClientSession() as s:
        status, body = await _get(s, f"{proxy.url}/ollamon/ready")
        health_status, health = await _get(s, f"{proxy.url}/ollamon/health")
    assert status == 503 and body["status"] == "not ready" and body["db"] == "ok"
    (reason,) = body["reasons"]
    assert reason.startswith(f"upstream http://{dead}") and "unreachable" in reason
    assert health_status == 200 and health["status"] == "degraded"  # health itself always answers 200


async def test_kill_9_mid_burst_is_reported_by_the_next_start(emulator: Any, tmp_path: Path) -> None:
    """A kill -9 loses what was queued and in flight. The next start says how many, from the run journal."""
    config = tmp_path / "c.yaml"
    # A long flush interval keeps the quick requests' records queued, so the kill certainly catches some.
    config.write_text(
        "storage:\n  flush_interval_ms: 3000\n  batch_rows: 10000\n"
        "sampling:\n  enabled: false\ninventory:\n  enabled: false\nalerts:\n  enabled: false\n"
    )
    journal = tmp_path / "sub.db.run.json"
    proc, url = await serve_subprocess(tmp_path, emulator.url, config=config.read_text())
    streams: list[asyncio.Future[Any]] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(12):
            async with s.post(f"{url}/api/generate", json=BODY) as r:
                await r.read()

        async def slow() -> None:
            async with s.post(
                f"{url}/api/generate",
                json={"model": "llama3.2", "prompt": "x"},
                headers={"X-Emulate": "tokens=200; interval_ms=50"},
            ) as r:
                await r.read()

        streams = [asyncio.ensure_future(slow()) for _ in range(3)]
        deadline = time.monotonic() + 10
        snap: dict[str, Any] = {}
        while not (snap.get("queued") == 12 and snap.get("in_flight") == 3):
            assert time.monotonic() < deadline, f"journal never showed the burst: {snap}"
            await asyncio.sleep(0.05)
            try:
                snap = json.loads(journal.read_text())
            except (OSError, ValueError):
                continue
        assert snap["pid"] == proc.pid and snap["clean_shutdown"] is False
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await asyncio.gather(*streams, return_exceptions=True)
        assert proc.stderr is not None
        await proc.stderr.read()
    assert sqlite3.connect(tmp_path / "sub.db").execute(
        "SELECT count(*) FROM inference_metrics"
    ).fetchone() == (0,)

    proc2, url2 = await serve_subprocess(tmp_path, emulator.url, config=config.read_text())
    try:
        async with aiohttp.ClientSession() as s:
            _, health = await _get(s, f"{url2}/ollamon/health")
    finally:
        proc2.send_signal(signal.SIGTERM)
        assert proc2.stderr is not None
        err = (await proc2.stderr.read()).decode()
        assert await proc2.wait() == 0
    previous = health["previous_run"]
    assert previous["pid"] == proc.pid and previous["clean_shutdown"] is False
    assert previous["queued"] == 12 and previous["in_flight"] == 3
    assert (
        f"the previous run (pid {proc.pid}, last journal {previous['updated_at']}) did not shut down cleanly: "
        "about 12 finished records were queued or being written and 3 requests were in flight" in err
    )
    # The second run stopped cleanly: a third start has nothing to report.
    assert json.loads(journal.read_text())["clean_shutdown"] is True
