"""Faults between ollamon and Redis, injected by the TCP fault proxy in front of a private redis-server.

Redis is a disposable hot view (SQLite is the source of truth), so whatever Redis does, requests must be
proxied as fast as before and every one must land in SQLite: requests seen = rows written + rows dropped
or lost (the writer's counters). When Redis comes back, the view fills again.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from tests.faults import FaultProxy
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.proxy import MakeProxy, ProxyHandle, stop_or_show_what_hangs
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.timeout(90)

BODY = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
QUIET = {"sampling__enabled": False}
BATCH = 20


async def assert_accounted(proxy: ProxyHandle, requests: int) -> list[dict[str, Any]]:
    """Every request became a row or was counted as dropped/lost, and here none was dropped or lost."""
    await proxy.wait_rows(requests, within=20)
    await asyncio.sleep(0.3)
    rows = proxy.rows()
    stats = proxy.writer_stats
    assert len(rows) + stats["dropped"] + stats["lost"] == requests, (len(rows), stats)
    assert stats["written"] == len(rows) == requests and stats["dropped"] == stats["lost"] == 0, stats
    return rows


async def timed_batch(s: aiohttp.ClientSession, proxy: ProxyHandle, n: int = BATCH) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
            await r.read()
        assert r.status == 200
        times.append(time.perf_counter() - start)
    return times


def recent_ids(server: RedisServer) -> set[str]:
    """Request ids in the hot view, read straight from redis-server (not through the fault proxy)."""
    with redis.Redis.from_url(server.url, socket_timeout=2) as client:
        raw = client.lrange("ollamon:recent", 0, -1)
    return {orjson.loads(item)["request_id"] for item in raw}


async def wait_until(predicate: Callable[[], Any], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.1)


async def health(s: aiohttp.ClientSession, proxy: ProxyHandle) -> dict[str, Any]:
    async with s.get(f"{proxy.url}/ollamon/health") as r:
        result: dict[str, Any] = await r.json()
        return result


async def _outage(
    emulator: RunningEmulator,
    make_proxy: MakeProxy,
    redis_server: RedisServer,
    fail: Callable[[FaultProxy], None],
    heal: Callable[[FaultProxy], None],
) -> None:
    """Healthy batch, Redis fails, batch during the outage, Redis heals, one more request."""
    async with FaultProxy(redis_server.port) as fp:
        proxy = await make_proxy(
            emulator.url, redis__url=f"redis://{fp.address}/0", redis__timeout_ms=100, **QUIET
        )
        async with aiohttp.ClientSession() as s:
            await timed_batch(s, proxy, 3)  # warm-up: pools, first-request costs
            before = await timed_batch(s, proxy)
            # The view works, through the fault proxy.
            await wait_until(lambda: len(recent_ids(redis_server)) == BATCH + 3, 10, "23 requests in Redis")
            fail(fp)
            during = await timed_batch(s, proxy)
            down = await health(s, proxy)
            for _ in range(50):  # the view notices on its next push or probe
                if down["redis"] == "down":
                    break
                await asyncio.sleep(0.1)
                down = await health(s, proxy)
            heal(fp)
            async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
                await r.read()
                last_id = r.headers["X-Request-Id"]
        rows = await assert_accounted(proxy, 3 + 2 * BATCH + 1)
        # The hot view came back by itself (its back-off is at most 10 s) and took new records.
        await wait_until(lambda: last_id in recent_ids(redis_server), 20, "the view to recover")
        # With the fault proxy still up: a hung Redis must not hang shutdown (task stacks if it does).
        await stop_or_show_what_hangs(proxy, within_s=30)
    assert statistics.median(during) < statistics.median(before) * 2 + 0.01, (
        f"median {statistics.median(before) * 1000:.1f} ms before, {statistics.median(during) * 1000:.1f} ms during"
    )
    assert all(row["success"] == 1 for row in rows)
    assert down["redis"] == "down" and down["status"] == "degraded"


async def test_redis_hung_blackhole_slows_nothing_and_loses_nothing(
    emulator: RunningEmulator, make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    await _outage(emulator, make_proxy, redis_server, FaultProxy.blackhole, FaultProxy.pass_through)


async def test_redis_stalled_slows_nothing_and_loses_nothing(
    emulator: RunningEmulator, make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    await _outage(emulator, make_proxy, redis_server, FaultProxy.stall, FaultProxy.pass_through)


async def test_redis_reset_slows_nothing_and_loses_nothing(
    emulator: RunningEmulator, make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    await _outage(emulator, make_proxy, redis_server, FaultProxy.reset, FaultProxy.pass_through)


async def test_redis_dead_behind_the_proxy_slows_nothing_and_loses_nothing(
    emulator: RunningEmulator, make_proxy: MakeProxy, redis_server: RedisServer
) -> None:
    def kill(fp: FaultProxy) -> None:
        redis_server.stop()  # the fault proxy now resets every connection it cannot forward
        fp.reset()  # and the live ones die with the server

    def revive(fp: FaultProxy) -> None:
        redis_server.start()
        fp.pass_through()

    await _outage(emulator, make_proxy, redis_server, kill, revive)
