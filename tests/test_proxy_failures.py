"""When things go wrong: upstream down or silent, Redis dying, shutdown with streams in flight, big uploads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy
from tests.fixtures.serve import serve_subprocess


async def test_upstream_down_gives_502_in_ollama_shape(make_proxy: MakeProxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proxy = await make_proxy(dead)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        ) as r:
            body = await r.json()
            assert r.status == 502 and r.headers["Content-Type"].startswith("application/json")
        async with s.get(f"{proxy.url}/api/tags") as r2:
            assert r2.status == 502
        async with s.get(f"{proxy.url}/ollamon/health") as h:
            health = await h.json()
    assert set(body) == {"error"} and dead in body["error"]
    (row,) = await proxy.wait_rows(1)
    assert row["success"] == 0 and row["status_code"] == 502 and row["model_name"] == "m:latest"
    errors = await proxy.wait_rows(2, "error_metrics")
    assert {e["error_type"] for e in errors} == {"upstream_unreachable"}
    assert {e["endpoint"] for e in errors} == {"/api/chat", "/api/tags"}
    assert health["upstream"]["reachable"] is False and health["status"] == "degraded"


async def test_idle_upstream_before_headers_gives_504(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, server__idle_timeout_s=0.3)
    async with aiohttp.ClientSession() as s:
        start = time.perf_counter()
        async with s.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers={"X-Emulate": "stall_ms=1500"},
        ) as r:
            body = await r.json()
        took = time.perf_counter() - start
    assert r.status == 504 and "0.3 s" in body["error"]
    assert 0.3 <= took < 1.0
    (row,) = await proxy.wait_rows(1)
    (err,) = await proxy.wait_rows(1, "error_metrics")
    assert row["status_code"] == 504 and err["error_type"] == "upstream_timeout"


async def test_idle_upstream_mid_stream_aborts_but_flowing_stream_never_times_out(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(emulator.url, server__idle_timeout_s=0.4)
    async with aiohttp.ClientSession() as s:
        # 20 tokens 100 ms apart: 2 s in all, never 0.4 s silent -> completes.
        async with s.post(
            f"{proxy.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers={"X-Emulate": "tokens=20; interval_ms=100"},
        ) as r:
            lines = (await r.read()).splitlines()
        assert json.loads(lines[-1])["done"] is True
        # A 1 s gap between tokens: cut off, and the client sees a broken stream, not a clean end.
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(
                f"{proxy.url}/api/generate",
                json={"model": "llama3.2", "prompt": "x"},
                headers={"X-Emulate": "tokens=5; interval_ms=1000"},
            ) as r2:
                await r2.read()
    rows = await proxy.wait_rows(2)
    assert rows[0]["success"] == 1
    assert rows[1]["success"] == 0 and "sent nothing" in rows[1]["error_message"]


async def test_redis_dying_mid_run_slows_nothing_and_loses_nothing(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    proxy = await make_proxy(emulator.url, redis__url=redis_server.url, redis__timeout_ms=100)
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}

    async def batch(s: aiohttp.ClientSession, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            async with s.post(f"{proxy.url}/api/generate", json=body) as r:
                await r.read()
                assert r.status == 200
            times.append(time.perf_counter() - start)
        return times

    async def health(s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.get(f"{proxy.url}/ollamon/health") as h:
            result: dict[str, Any] = await h.json()
            return result

    async with aiohttp.ClientSession() as s:
        before = await batch(s, 20)
        assert (await health(s))["redis"] == "ok"
        redis_server.stop()
        during = await batch(s, 20)
        # Health asks Redis itself (a PING cached for about a second): it does not depend on whether a
        # batch happened to be pushed since Redis died.
        await asyncio.sleep(1.1)
        down = await health(s)
        redis_server.start()
        await asyncio.sleep(1.1)
        up = await health(s)
    # A request path that waited on Redis would pay its 100 ms timeout; generous bounds for a busy machine.
    assert statistics.median(during) < statistics.median(before) * 2 + 0.05
    rows = await proxy.wait_rows(40)
    assert len(rows) == 40
    assert down["redis"] == "down" and down["status"] == "degraded"
    assert up["redis"] == "ok" and up["status"] == "ok"


async def test_sigterm_finishes_streams_and_loses_no_record(emulator: Any, tmp_path: Path) -> None:
    proc, url = await serve_subprocess(tmp_path, emulator.url)
    body = {"model": "llama3.2", "prompt": "x"}

    async def one(s: aiohttp.ClientSession, i: int) -> bytes:
        async with s.post(
            f"{url}/api/generate", json=body, headers={"X-Emulate": "tokens=15; interval_ms=40"}
        ) as r:
            return await r.read()

    async with aiohttp.ClientSession() as s:
        # Many quick ones queued in the writer, plus 4 streams still running when SIGTERM lands.
        for _ in range(30):
            async with s.post(f"{url}/api/generate", json={**body, "stream": False}) as r:
                await r.read()
        streams = [asyncio.ensure_future(one(s, i)) for i in range(4)]
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        outputs = await asyncio.gather(*streams)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    for out in outputs:
        assert json.loads(out.splitlines()[-1])["done"] is True
    con = sqlite3.connect(tmp_path / "sub.db")
    total, ok = con.execute("SELECT count(*), sum(success) FROM inference_metrics").fetchone()
    assert (total, ok) == (34, 34)


async def test_big_blob_upload_streams_with_bounded_memory(emulator: Any, tmp_path: Path) -> None:
    proc, url = await serve_subprocess(tmp_path, emulator.url)
    ps = psutil.Process(proc.pid)
    # Let startup finish (the tokenizer loads on a thread at startup, slowly on a busy machine): RSS must
    # hold still within 1 MiB for a whole second before it counts as the base.
    base_rss, still = ps.memory_info().rss, 0
    for _ in range(300):
        await asyncio.sleep(0.2)
        now = ps.memory_info().rss
        still = still + 1 if abs(now - base_rss) < 1 << 20 else 0
        base_rss = max(base_rss, now) if still else now
        if still >= 5:
            break
    chunk = os.urandom(1 << 20)
    n = 100
    digest = hashlib.sha256(chunk * n).hexdigest()
    peak = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal peak
        for _ in range(n):
            peak = max(peak, ps.memory_info().rss)
            yield chunk

    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{url}/api/blobs/sha256:{digest}", data=body(), headers={"Content-Length": str(n << 20)}
            ) as r:
                assert r.status == 201, await r.text()
            async with s.head(f"{url}/api/blobs/sha256:{digest}") as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert peak - base_rss < 40 << 20, f"proxy RSS grew by {(peak - base_rss) >> 20} MiB for a 100 MiB upload"


async def test_cli_bad_config_names_file_key_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("server:\n  idle_timeout_s: -5\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(cfg),
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert f"{cfg}: server.idle_timeout_s: must be > 0" in err.decode()


async def test_cli_unusable_db_path_is_a_clear_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_bytes(b"this is not a database" * 100)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--db",
        str(not_a_db),
        "--no-redis",
        cwd=tmp_path,
        env={**os.environ, "OLLAMON_CONFIG": ""},
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert str(not_a_db) in err.decode() and "storage error" in err.decode()
