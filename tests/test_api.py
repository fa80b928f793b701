"""/ollamon/api/* over real HTTP: every endpoint, every bad parameter, and Redis answering like SQLite."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.keys import REDIS_KEY, WRITER_KEY
from storage.browse import RequestQuery, recent_requests
from storage.queries import Filters, summary, timeseries
from storage.records import iso_utc
from tests.analytics_gen import open_store, records_between, write
from tests.fixtures.proxy import MakeProxy, ProxyHandle

API = "/ollamon/api"


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return resp.status, await resp.json()


async def traffic(proxy: ProxyHandle, n_ok: int = 6) -> list[str]:
    """``n_ok`` good requests on two models, one upstream error and one mid-stream error; returns ids."""
    ids = []
    async with aiohttp.ClientSession() as s:
        for i in range(n_ok):
            body = {"model": ["llama3.2", "qwen3:0.6b"][i % 2], "prompt": f"hi {i}", "stream": i % 3 != 0}
            async with s.post(f"{proxy.url}/api/generate", json=body, headers={"X-User-Id": "ann"}) as r:
                await r.read()
                ids.append(r.headers["X-Request-Id"])
        for header in ("error_status=500", "error_after=2"):
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
            async with s.post(f"{proxy.url}/api/chat", json=body, headers={"X-Emulate": header}) as r:
                await r.read()
                ids.append(r.headers["X-Request-Id"])
    await proxy.wait_rows(len(ids))
    await proxy.wait_rows(2, "error_metrics")
    return ids


async def test_every_endpoint(emulator: Any, proxy: ProxyHandle) -> None:
    ids = await traffic(proxy)
    status, body = await get(f"{proxy.url}{API}/summary?window=1h")
    assert status == 200 and body["exact"] is True
    o = body["overall"]
    assert (o["requests"], o["successful"], o["failed"], o["cancelled"]) == (8, 6, 2, 0)
    assert o["error_rate"] == 2 / 8
    assert {m["model"]: m["requests"] for m in body["models"]} == {"llama3.2:latest": 5, "qwen3:0.6b": 3}
    rows = proxy.rows()
    assert o["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)
    # the rollups answer the same counts
    status, rolled = await get(f"{proxy.url}{API}/summary?window=2h&exact=false&model=llama3.2")
    assert status == 200 and rolled["exact"] is False and rolled["overall"]["requests"] == 5

    status, ts = await get(f"{proxy.url}{API}/timeseries?metric=requests,ttft_ms_p95&bucket=1m&window=10m")
    assert status == 200 and sum(p["requests"] for p in ts["series"]) == 8
    assert ts["metrics"] == ["requests", "ttft_ms_p95"] and len(ts["series"]) in (10, 11)

    # cursor pagination walks every row once, newest first
    seen: list[str] = []
    url = f"{proxy.url}{API}/requests?limit=3"
    while True:
        status, page = await get(url)
        assert status == 200 and len(page["requests"]) <= 3
        seen += [r["request_id"] for r in page["requests"]]
        if page["next_cursor"] is None:
            break
        url = f"{proxy.url}{API}/requests?limit=3&cursor={page['next_cursor']}"
    assert seen == list(reversed(ids))
    status, failed = await get(f"{proxy.url}{API}/requests?success=false")
    assert [r["request_id"] for r in failed["requests"]] == list(reversed(ids[-2:]))
    status, mine = await get(f"{proxy.url}{API}/requests?user=ann&model=qwen3:0.6b")
    assert len(mine["requests"]) == 3 and all(r["user_id"] == "ann" for r in mine["requests"])

    status, one = await get(f"{proxy.url}{API}/requests/{ids[-1]}")
    assert status == 200 and one["request"]["request_id"] == ids[-1] and one["request"]["success"] is False
    assert one["errors"][0]["error_type"] == "stream_error"
    status, missing = await get(f"{proxy.url}{API}/requests/nope-123")
    assert status == 404 and "nope-123" in missing["error"]

    status, errs = await get(f"{proxy.url}{API}/errors?window=1h")
    assert status == 200 and errs["total"] == 2
    assert {(g["error_type"], g["model_name"], g["count"]) for g in errs["groups"]} == {
        ("upstream_status", "llama3.2:latest", 1),
        ("stream_error", "llama3.2:latest", 1),
    }

    status, stats = await get(f"{proxy.url}{API}/stats")
    assert status == 200 and stats["tables"]["inference_metrics"] == 8
    assert stats["tables"]["rollup_minute"] >= 3 and stats["writer"]["dropped"] == 0
    assert stats["records"]["inference_metrics"]["newest"] == max(r["timestamp"] for r in rows)
    assert stats["file_bytes"] > 0 and stats["auto_vacuum"] == "incremental"
    status, health = await get(f"{proxy.url}/ollamon/health")
    assert health["analytics"]["rollup_batches"] >= 1


BAD = [
    ("summary?window=abc", "window"),
    ("summary?window=0s", "window"),
    ("summary?window=1h&since=2h", "window"),
    ("summary?since=tomorrow", "since"),
    ("summary?since=1h&until=2h", "since"),
    ("summary?until=1e300", "until"),
    ("summary?exact=maybe", "exact"),
    ("summary?user=bob&exact=false", "exact"),
    ("summary?per_model=2", "per_model"),
    ("summary?model=", "model"),
    ("summary?bogus=1", "bogus"),
    ("summary?model=a&model=b", "model"),
    ("timeseries?bucket=7m", "bucket"),
    ("timeseries?metric=nope", "metric"),
    ("timeseries?metric=", "metric"),
    ("timeseries?bucket=1m&window=30d", "bucket"),
    ("timeseries?since=x", "since"),
    ("requests?limit=0", "limit"),
    ("requests?limit=ten", "limit"),
    ("requests?limit=1001", "limit"),
    ("requests?cursor=%%%", "cursor"),
    ("requests?cursor=WzFd", "cursor"),
    ("requests?success=perhaps", "success"),
    ("requests?since=never", "since"),
    ("requests?until=soon", "until"),
    ("requests?endpoint=%01", "endpoint"),
    ("requests/abc?x=1", "x"),
    ("errors?limit=-1", "limit"),
    ("errors?window=-5m", "window"),
    ("errors?user=bob", "user"),
    ("stats?verbose=1", "verbose"),
]


async def test_every_bad_parameter_is_a_400_naming_it(emulator: Any, proxy: ProxyHandle) -> None:
    for query, param in BAD:
        status, body = await get(f"{proxy.url}{API}/{query}")
        assert status == 400, (query, status, body)
        assert f"'{param}'" in body["error"], (query, body)
    long_id = "x" * 200
    status, body = await get(f"{proxy.url}{API}/requests/{long_id}")
    assert status == 400 and "'request_id'" in body["error"]


async def test_recent_requests_from_redis_equal_sqlite(
    emulator: Any, make_proxy: MakeProxy, redis_server: Any
) -> None:
    proxy = await make_proxy(emulator.url, redis__url=redis_server.url)
    await traffic(proxy)
    view = proxy.app[REDIS_KEY]
    writer = proxy.app[WRITER_KEY]
    for _ in range(200):
        if (
            view.stats()["written_batches"] >= writer.stats()["batches"]
            and not view.stats()["pending_batches"]
        ):
            break
        await asyncio.sleep(0.02)
    conn = sqlite3.connect(proxy.db_path)
    for query, rq in (
        ("limit=3", RequestQuery(limit=3)),
        ("limit=2&success=true", RequestQuery(limit=2, success=True)),
        ("limit=1&model=qwen3:0.6b", RequestQuery(limit=1, filters=Filters(model="qwen3:0.6b"))),
        ("limit=50", RequestQuery(limit=50)),  # more than Redis can vouch for: SQLite answers
    ):
        status, body = await get(f"{proxy.url}{API}/requests?{query}")
        assert status == 200
        assert body["source"] == ("sqlite" if "50" in query else "redis"), query
        direct = recent_requests(conn, rq)
        assert body["requests"] == direct["requests"] and body["next_cursor"] == direct["next_cursor"], query
    # with Redis gone, the same question gets the same answer from SQLite
    redis_server.stop()
    status, body = await get(f"{proxy.url}{API}/requests?limit=3")
    assert (
        body["source"] == "sqlite"
        and body["requests"] == recent_requests(conn, RequestQuery(limit=3))["requests"]
    )


async def test_summary_and_trend_over_generated_history(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    path = tmp_path / "hist.db"
    now = time.time()
    store = await open_store(path)
    await write(store, records_between(random.Random(8), now - 3 * 86400, now - 60, 3000))
    await store.close()
    proxy = await make_proxy(emulator.url, db=path)
    since, until = iso_utc(now - 86400 - 37), iso_utc(now - 5)
    status, body = await get(f"{proxy.url}{API}/summary?since={since}&until={until}")
    conn = sqlite3.connect(path)
    s0 = (
        time.mktime(time.strptime(since[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(since[20:23]) / 1000
    )
    u0 = (
        time.mktime(time.strptime(until[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + int(until[20:23]) / 1000
    )
    assert status == 200 and body == summary(conn, s0, u0)
    assert body["exact"] is False and body["overall"]["requests"] > 500
    status, ts = await get(
        f"{proxy.url}{API}/timeseries?metric=requests,response_time_ms_p99&bucket=1h&window=3d"
    )
    assert status == 200 and ts["exact"] is False
    assert (
        sum(p["requests"] for p in ts["series"]) == summary(conn, now - 4 * 86400, now)["overall"]["requests"]
    )
    again = timeseries(conn, now - 3 * 86400, now, "1h", ["requests", "response_time_ms_p99"])
    assert [p["requests"] for p in ts["series"][1:-1]] == [p["requests"] for p in again["series"][1:-1]]
