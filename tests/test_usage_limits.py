"""Rate limits: the sliding-window arithmetic against a controlled clock, 429 answers through a real
proxy, tokens charged from records, and two proxies sharing one real Redis (and falling back without it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.usage.identity import KeyLimits
from proxy.usage.keys import hash_key, new_key
from proxy.usage.limits import WINDOW_S, Admitted, MemoryLimiter, Over, retry_after_s
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.polling import until

pytestmark = pytest.mark.timeout(120)

GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rpm_sliding_window_counts_exactly() -> None:
    clock = Clock(1000 * WINDOW_S + 30)  # half-way through a minute
    lim = MemoryLimiter(clock)
    scope = [("key:a", KeyLimits(rpm=10))]
    assert all(isinstance(lim.acquire(scope), Admitted) for _ in range(10))
    over = lim.acquire(scope)
    assert isinstance(over, Over) and over.kind == "rpm" and over.limit == 10
    # 10 in this bucket, none before: admitted again once the next bucket's weight of these 10 is <= 9,
    # i.e. 10 * (1 - f) + 1 <= 10 -> f >= 0.1: 30 s to the boundary + 6 s.
    assert over.retry_after_s == pytest.approx(36.0)
    clock.t += 35.9
    assert isinstance(lim.acquire(scope), Over)
    clock.t += 0.2
    assert isinstance(lim.acquire(scope), Admitted)
    # Two minutes on, everything has slid out: 10 again.
    clock.t += 2 * WINDOW_S
    assert sum(isinstance(lim.acquire(scope), Admitted) for _ in range(12)) == 10


def test_retry_after_from_the_previous_bucket() -> None:
    # 8 in the previous minute, 1 in this one, limit 5, 15 s in: 8 * (1 - f) + 1 + 1 <= 5 -> f >= 0.625.
    assert retry_after_s(8, 1, 5, 0.25) == pytest.approx((0.625 - 0.25) * WINDOW_S)
    assert retry_after_s(0, 0, 5, 0.5) == 0.0


def test_concurrency_and_tokens_and_scopes() -> None:
    clock = Clock(500 * WINDOW_S)
    lim = MemoryLimiter(clock)
    key, team = ("key:a", KeyLimits(concurrency=2)), ("team:t", KeyLimits(tpm=100))
    first, second = lim.acquire([key, team]), lim.acquire([key, team])
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    third = lim.acquire([key, team])
    assert isinstance(third, Over) and third.scope == "key:a" and third.kind == "concurrency"
    lim.release(first)
    assert lim.held("key:a") == 1
    again = lim.acquire([key, team])
    assert isinstance(again, Admitted)
    lim.charge(["team:t"], 99)  # 99 + 1 <= 100: still admitted
    lim.release(again)
    assert isinstance(lim.acquire([team]), Admitted)
    lim.charge(["team:t"], 1)
    over = lim.acquire([team])
    assert isinstance(over, Over) and over.scope == "team:t" and over.kind == "tpm"


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


async def fire(
    p: ProxyHandle,
    n: int,
    key: str | None = None,
    body: Any = GEN,
    connections: int = 100,
    **headers: str,
) -> list[int]:
    """``n`` requests at once, over at most ``connections`` client connections (aiohttp's default 100)."""
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:

        async def one() -> int:
            async with s.post(f"{p.url}/api/generate", json=body, headers=headers) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_429_shape_headers_and_record(emulator: Any, make_proxy: MakeProxy) -> None:
    key = new_key()
    keys = [{"name": "ci", "hash": hash_key(key), "rpm": 3, "team": "t"}]
    p = await make_proxy(emulator.url, auth__mode="required", auth__keys=keys)
    assert await fire(p, 3, key) == [200, 200, 200]
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{p.url}/api/generate", json=GEN, headers={"Authorization": f"Bearer {key}"})
        body, h = await r.json(), r.headers
        r.release()
    assert r.status == 429
    retry = int(h["Retry-After"])
    assert 1 <= retry <= 2 * WINDOW_S and h["X-RateLimit-Reset"] == str(retry)
    assert h["X-RateLimit-Limit"] == "3" and h["X-RateLimit-Remaining"] == "0"
    assert body == {"error": f"ollamon: rate limit exceeded (rpm 3 per key); retry in {retry} s"}
    rows = await p.wait_rows(4)
    assert [r["status_code"] for r in rows] == [200, 200, 200, 429]
    assert rows[3]["api_key_id"] == "cfg-ci" and rows[3]["team"] == "t" and rows[3]["model_name"]
    errors = await p.wait_rows(1, "error_metrics")
    assert errors[0]["error_type"] == "rate_limited" and errors[0]["api_key_id"] == "cfg-ci"
    # Non-inference routes are not rate limited.
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{p.url}/api/tags", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200


async def test_concurrency_limit_releases_when_the_stream_ends(emulator: Any, make_proxy: MakeProxy) -> None:
    p = await make_proxy(emulator.url, limits__global_concurrency=1)
    slow = {"X-Emulate": "interval_ms=40;tokens=25"}
    first = asyncio.ensure_future(fire(p, 1, None, {**GEN, "stream": True}, **slow))
    await until(lambda: _in_flight(p) == 1, what="stream started")
    assert await fire(p, 1) == [429]
    assert await first == [200]
    assert await fire(p, 1) == [200]  # the slot came back


def _in_flight(p: ProxyHandle) -> int:
    from proxy.keys import FORWARDER_KEY

    return p.app[FORWARDER_KEY].in_flight


async def test_tokens_per_minute_charged_from_records(emulator: Any, make_proxy: MakeProxy) -> None:
    key = new_key()
    # The emulator answers "hi" with 7 prompt + 8 completion tokens (its ground truth, checked below).
    keys = [{"name": "t", "hash": hash_key(key), "tpm": 20}]
    p = await make_proxy(emulator.url, auth__mode="required", auth__keys=keys)
    assert await fire(p, 1, key) == [200]
    rows = await p.wait_rows(1)
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] == 15
    from proxy.api.auth import GATE_KEY

    lim = p.app[GATE_KEY].limiter
    assert isinstance(lim, MemoryLimiter)
    await until(
        lambda: lim._tok.get("key:cfg-t") is not None and lim._tok["key:cfg-t"].cur == 15, what="charge"
    )
    assert await fire(p, 1, key) == [200]  # 15 + 1 <= 20
    await until(lambda: lim._tok["key:cfg-t"].cur == 30, what="second charge")
    assert await fire(p, 1, key) == [429]


def _backend(p: ProxyHandle) -> Any:
    async def read() -> Any:
        return (await get_json(f"{p.url}/ollamon/health"))["auth"]

    return read


async def test_two_instances_share_one_limit_through_redis(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any, tmp_path: Path
) -> None:
    limit = 60
    # The longest timeout the config allows instead of the default 20 ms: a busy 2-core test machine (clients,
    # two proxies and the emulator share this one event loop) must not fall back by accident (500 ms did, once,
    # in a full run).
    kw = {"redis__url": redis_server.url, "limits__global_rpm": limit, "limits__redis_timeout_ms": 1000}
    a = await make_proxy(emulator.url, **kw)
    b = await make_proxy(emulator.url, **kw)
    codes = await asyncio.gather(fire(a, 45), fire(b, 45))
    admitted = sum(c == 200 for batch in codes for c in batch)
    assert abs(admitted - limit) <= limit * 0.05, codes
    assert all(c in (200, 429) for batch in codes for c in batch)
    assert (await _backend(a)())["limits_backend"] == "redis"

    redis_server.stop()
    for p in (a, b):
        deadline = asyncio.get_running_loop().time() + 10
        while (state := await _backend(p)())["limits_backend"] != "memory":
            assert asyncio.get_running_loop().time() < deadline, state
            await asyncio.sleep(0.1)
        assert state["limits_shared"] is False and state["redis_error"]
        # Each instance now limits alone (per-instance): requests are still served, none fail on Redis.
        assert await fire(p, 5) == [200] * 5

    redis_server.start()
    for p in (a, b):
        deadline = asyncio.get_running_loop().time() + 10
        while (await _backend(p)())["limits_backend"] != "redis":
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
    # The restarted Redis is empty: one shared window again.
    codes = await asyncio.gather(fire(a, 45), fire(b, 45))
    admitted = sum(c == 200 for batch in codes for c in batch)
    assert abs(admitted - limit) <= limit * 0.05, codes


async def test_a_hung_redis_never_fails_or_stalls_a_request(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    p = await make_proxy(emulator.url, redis__url=redis_server.url, limits__global_rpm=1000)
    assert await fire(p, 2) == [200, 200]
    redis_server.freeze()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await fire(p, 5) == [200] * 5  # limited in memory meanwhile
        # Five requests, the first waiting at most limits.redis_timeout_ms (20 ms) for Redis: far under 5 s
        # even on a busy machine (a request that waited on Redis' own socket timeouts would take seconds).
        assert loop.time() - t0 < 5
        state = (await get_json(f"{p.url}/ollamon/health"))["auth"]
        assert state["limits_backend"] == "memory" and "Timeout" in state["redis_error"]
    finally:
        redis_server.thaw()
    deadline = asyncio.get_running_loop().time() + 10
    while (await get_json(f"{p.url}/ollamon/health"))["auth"]["limits_backend"] != "redis":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    assert await fire(p, 2) == [200, 200]


async def test_concurrency_shared_through_redis_and_released(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    import redis

    kw = {"redis__url": redis_server.url, "limits__global_concurrency": 1, "limits__redis_timeout_ms": 500}
    a, b = await make_proxy(emulator.url, **kw), await make_proxy(emulator.url, **kw)
    slow = {"X-Emulate": "interval_ms=40;tokens=25"}
    first = asyncio.ensure_future(fire(a, 1, None, {**GEN, "stream": True}, **slow))
    await until(lambda: _in_flight(a) == 1, what="stream started on a")
    r = redis.Redis.from_url(redis_server.url)
    try:
        await until(lambda: r.zcard("ollamon:rl:global:c") == 1, what="slot taken in Redis")
        assert await fire(b, 1) == [429]  # the other instance sees the slot a holds
        assert await first == [200]
        await until(lambda: r.zcard("ollamon:rl:global:c") == 0, what="slot released in Redis")
    finally:
        r.close()
    assert await fire(b, 1) == [200]


# -- leased permits (proxy/usage/lease.py) ---------------------------------------------------------------


async def _away_from_minute_end() -> None:
    """Wait out the last seconds of a minute: these tests read one minute's counter in Redis exactly."""
    import time

    left = WINDOW_S - time.time() % WINDOW_S
    if left < 8:
        await asyncio.sleep(left + 0.1)


async def test_leased_rpm_counts_exactly_in_redis_and_gives_back(redis_server: Any) -> None:
    import time

    import redis

    from proxy.usage.limits_redis import RedisLimiter

    await _away_from_minute_end()
    lim = RedisLimiter(redis_server.url, timeout_s=0.5, concurrency_ttl_s=60)
    scope = [("global", KeyLimits(rpm=500))]
    r = redis.Redis.from_url(redis_server.url)
    try:
        admitted = 0
        for _ in range(560):
            if isinstance(await lim.acquire(scope), Admitted):
                admitted += 1
            await asyncio.sleep(0.001)  # let background refills run, as between real requests
        counter = f"ollamon:rl:global:r:{int(time.time()) // WINDOW_S}"
        ls = lim.leases.table[("global", "r")]
        # One instance: batch capped at 500 x 2 % = 10; leases served most requests, and never over.
        assert lim.leases.served > 200 and ls.cap == 10
        assert 500 - ls.cap <= admitted <= 500
        assert int(r.get(counter) or 0) == admitted + ls.left  # leased permits count in Redis at once
        over = await lim.acquire(scope)
        assert isinstance(over, Over) and over.kind == "rpm" and over.retry_after_s > 0
        await lim.close()  # returns what the lease still holds
        assert int(r.get(counter) or 0) == admitted
    finally:
        r.close()


async def test_leased_tokens_spend_locally_then_charge_redis(redis_server: Any) -> None:
    import time

    import redis

    from proxy.usage.limits_redis import RedisLimiter

    await _away_from_minute_end()
    lim = RedisLimiter(redis_server.url, timeout_s=0.5, concurrency_ttl_s=60)
    scope = [("team:t", KeyLimits(tpm=5000))]  # cap 100 tokens per lease
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert isinstance(await lim.acquire(scope), Admitted)  # per-request path; starts a lease
        ls = lim.leases.table[("team:t", "t")]
        await until(lambda: ls.left >= 1, what="token lease")
        counter = f"ollamon:rl:team:t:t:{int(time.time()) // WINDOW_S}"
        leased = ls.left
        assert int(r.get(counter) or 0) == leased
        assert isinstance(await lim.acquire(scope), Admitted) and lim.leases.served == 1
        await lim.charge(["team:t"], leased + 7)  # the lease covers `leased`, Redis gets the other 7
        assert int(r.get(counter) or 0) >= leased + 7  # (+ any refill granted meanwhile, counted at once)
        await until(lambda: int(r.get(counter) or 0) == leased + 7 + ls.left, what="refill counted")
    finally:
        await lim.close()
        r.close()


async def test_two_instances_uneven_load_share_one_limit_with_leases(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    from proxy.api.auth import GATE_KEY
    from proxy.usage.limits_redis import RedisLimiter

    await _away_from_minute_end()
    limit = 400
    # What is tested is the sharing, not the fallback: give Redis the longest timeout the config allows, and
    # keep the burst to 32 connections per client, so that a busy machine (clients, two proxies and the
    # emulator share this one event loop) does not push calls past it into the per-instance fallback.
    kw = {"redis__url": redis_server.url, "limits__global_rpm": limit, "limits__redis_timeout_ms": 1000}
    a = await make_proxy(emulator.url, **kw)
    b = await make_proxy(emulator.url, **kw)
    # Uneven: a takes three quarters of the load, b a quarter; together 1.25 x the limit.
    codes = await asyncio.gather(fire(a, 375, connections=32), fire(b, 125, connections=32))
    admitted = sum(c == 200 for batch in codes for c in batch)
    assert abs(admitted - limit) <= limit * 0.05, admitted
    assert all(c in (200, 429) for batch in codes for c in batch)
    limiters = [p.app[GATE_KEY].limiter for p in (a, b)]
    assert all(isinstance(lim, RedisLimiter) for lim in limiters)
    served = [lim.leases.served for lim in limiters if isinstance(lim, RedisLimiter)]
    assert served[0] > 0, served  # leases actually carried requests
    # The cap is 400 x 2 % / instances: 8 while only one instance had leased yet, then 4.
    assert all(
        ls.cap <= 8 for lim in limiters if isinstance(lim, RedisLimiter) for ls in lim.leases.table.values()
    )


async def test_fallback_divides_limits_among_the_instances_redis_counted(redis_server: Any) -> None:
    """Redis hangs under two instances: each falls back to its share (rpm 10 / 2 instances = 5), so the two
    together still admit the limit, not twice it. Before the heartbeat count each admitted all 10."""
    from proxy.usage.limits_redis import RedisLimiter, share_of

    a = RedisLimiter(redis_server.url, timeout_s=0.2, concurrency_ttl_s=60, lease=False)
    b = RedisLimiter(redis_server.url, timeout_s=0.2, concurrency_ttl_s=60, lease=False)
    try:
        await a.probe()
        await b.probe()
        await a.probe()  # a's first heartbeat ran before b existed
        assert (a.peers, b.peers) == (2, 2)
        redis_server.freeze()
        scope = [("global", KeyLimits(rpm=10))]
        admitted = 0
        for lim in (a, b):
            for _ in range(8):
                if isinstance(await lim.acquire(scope), Admitted):
                    admitted += 1
        assert a.backend == b.backend == "memory" and a.fallbacks == b.fallbacks == 8
        assert admitted == 10
        # A limit too small to split still lets each instance through once; unset limits stay unset.
        assert share_of([("k", KeyLimits(rpm=1, tpm=0, concurrency=3))], 2) == [
            ("k", KeyLimits(rpm=1, tpm=0, concurrency=1))
        ]
    finally:
        redis_server.thaw()
        await a.close()
        await b.close()
