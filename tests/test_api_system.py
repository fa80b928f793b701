"""``/ollamon/api/system`` and ``/ollamon/api/models`` on the real proxy, plus what the request rows get
from the inventory (model_version, cold loads) and the latest sample in Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis
from aiohttp import web

from proxy.api.system import system_view
from proxy.resources.sampler import SAMPLER_KEY, Sampler
from proxy.resources.system_stats import SystemReader
from tests.fixtures.proxy import MakeProxy, ProxyHandle

SYSTEM_KEYS = {
    "timestamp", "cpu_percent", "memory_percent", "memory_used_gb", "memory_total_gb", "swap_percent",
    "disk_percent", "disk_free_gb", "net_sent_bytes_per_s", "net_recv_bytes_per_s", "load_1m", "load_5m",
    "load_15m", "process_rss_mb", "process_cpu_percent", "gpus",
}  # fmt: skip


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.json()


async def until_latest(proxy: ProxyHandle) -> dict[str, Any]:
    for _ in range(200):
        status, body = await get_json(f"{proxy.url}/ollamon/api/system")
        assert status == 200
        if body["latest"] is not None and len(body["history"]) >= 3:
            return body  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError("no sample")


async def test_system_endpoint_latest_and_history(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(
        emulator.url, sampling__interval_s=0.05, sampling__store_every_s=0.1, inventory__enabled=True
    )
    body = await until_latest(proxy)
    latest = body["latest"]
    assert SYSTEM_KEYS <= set(latest)
    assert 0.0 <= latest["cpu_percent"] <= 100.0 and 0.0 < latest["memory_percent"] <= 100.0
    assert isinstance(latest["cpu_per_core"], list) and latest["cpu_per_core"]
    sampler = proxy.app[SAMPLER_KEY]
    assert body["gpu"]["state"] == sampler.gpu.status()["state"]  # type: ignore[union-attr]
    if body["gpu"]["state"] == "ok":  # a machine with a GPU (scripts/gpu-check runs there)
        assert latest["gpus"] and {"index", "name", "power_w", "memory_used_mb"} <= set(latest["gpus"][0])
    else:
        assert latest["gpus"] == [] and body["gpu"]["reason"]
    assert body["source"] == "memory" and body["resolution_s"] == 0.05 and body["minutes"] == 5.0
    stamps = [h["timestamp"] for h in body["history"]]
    assert stamps == sorted(stamps) and stamps[-1] == latest["timestamp"]
    assert "cpu_per_core" not in body["history"][0] and SYSTEM_KEYS <= set(body["history"][0])

    # Longer than the in-memory window: the stored rows (one per store_every_s).
    await proxy.wait_rows(2, "system_metrics")
    status, stored = await get_json(f"{proxy.url}/ollamon/api/system?minutes=60")
    assert status == 200 and stored["source"] == "database" and stored["resolution_s"] == 0.1
    rows = proxy.rows("system_metrics")
    assert [h["timestamp"] for h in stored["history"]] == [r["timestamp"] for r in rows][
        : len(stored["history"])
    ]
    assert SYSTEM_KEYS <= set(stored["history"][0])

    status, health = await get_json(f"{proxy.url}/ollamon/health")
    assert health["sampler"]["samples"] >= 3 and health["sampler"]["interval_s"] == 0.05
    assert health["inventory"]["reachable"] is True and health["inventory"]["models"] == 3


async def test_minutes_is_validated(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    for bad in ("abc", "0", "-1", "nan", "inf", "100000", ""):
        status, body = await get_json(f"{proxy.url}/ollamon/api/system?minutes={bad}")
        assert status == 400 and "minutes" in body["error"], (bad, body)


async def test_latest_is_null_before_the_first_sample(tmp_path: Path) -> None:
    app = web.Application()
    app[SAMPLER_KEY] = Sampler(SystemReader(tmp_path / "x.db"))  # never started
    app.router.add_get("/ollamon/api/system", system_view)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        status, body = await get_json(f"http://127.0.0.1:{runner.addresses[0][1]}/ollamon/api/system")
    finally:
        await runner.cleanup()
    assert status == 200 and body["latest"] is None and body["history"] == [] and body["enabled"] is True


async def test_models_endpoint_and_model_version_on_rows(make_emulator: Any, make_proxy: MakeProxy) -> None:
    emulator = await make_emulator(load_s=0.3)
    proxy = await make_proxy(emulator.url, inventory__enabled=True, inventory__cold_load_ms=150)
    status, body = await get_json(f"{proxy.url}/ollamon/api/models")
    assert status == 200 and body["enabled"] is True
    by_name = {m["model_name"]: m for m in body["models"]}
    digest = emulator.emu.resolve("llama3.2").digest
    assert set(by_name) == {"llama3.2:latest", "qwen3:0.6b", "all-minilm:latest"}
    assert by_name["llama3.2:latest"]["model_version"] == digest
    assert by_name["llama3.2:latest"]["loaded"] is False
    rids = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the first request loads the model (300 ms), the second finds it warm
            async with s.post(f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "hi"}) as r:
                assert r.status == 200
                await r.read()
                rids.append(r.headers["X-Request-Id"])
    rows = await proxy.wait_rows(2)
    assert [r["model_version"] for r in rows] == [digest, digest]
    assert rows[0]["load_duration_ms"] >= 250 and rows[1]["load_duration_ms"] < 150
    events = await wait_for_rows(proxy, "model_events", "event = 'load'")
    assert len(events) == 1 and events[0]["source"] == "request" and events[0]["request_id"] == rids[0]
    assert json.loads(events[0]["detail"])["load_duration_ms"] >= 250
    for _ in range(100):
        status, body = await get_json(f"{proxy.url}/ollamon/api/models")
        llama = next(m for m in body["models"] if m["model_name"] == "llama3.2:latest")
        if llama["loaded"]:
            break
        await asyncio.sleep(0.05)
    assert llama["loaded"] is True and llama["loaded_at"] is not None
    assert body["events"][0]["event"] == "load" and body["status"]["reachable"] is True


async def wait_for_rows(proxy: ProxyHandle, table: str, where: str) -> list[dict[str, Any]]:
    for _ in range(200):
        found = proxy.rows(table, where)
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {table} rows where {where}")


async def test_latest_sample_is_kept_in_redis(emulator: Any, make_proxy: MakeProxy, redis_url: str) -> None:
    proxy = await make_proxy(emulator.url, redis__url=redis_url, sampling__interval_s=0.05)
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        first = None
        while first is None and time.monotonic() < deadline:
            first = client.get("ollamon:system:latest")
            await asyncio.sleep(0.05)
        assert first is not None
        # Refreshed at every sample: wait for a newer one (no fixed sleep: a busy machine samples late).
        second = first
        while second == first and time.monotonic() < deadline + 10:
            await asyncio.sleep(0.05)
            second = client.get("ollamon:system:latest") or first
        ttl = client.ttl("ollamon:system:latest")
    finally:
        client.close()
    a, b = json.loads(first), json.loads(second or b"{}")
    assert a["system"]["timestamp"] < b["system"]["timestamp"]  # refreshed at every sample
    assert 0.0 <= b["system"]["memory_percent"] <= 100.0 and 0 < ttl <= 5
    assert proxy.app[SAMPLER_KEY].latest is not None
