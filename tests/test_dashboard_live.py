"""GET /ollamon/api/live: the frames' figures against the emulator's ground truth, the fan-out and its bounds."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest

from proxy.dashboard.live import HUB_KEY
from storage.histogram import error_bound, exact_quantile
from storage.records import iso_utc
from tests.dashboard_helpers import SseReader, generate
from tests.fixtures.proxy import MakeProxy, ProxyHandle
from tests.polling import until

FAST = {"dashboard__live_interval_s": 0.1}


async def open_stream(s: aiohttp.ClientSession, proxy: ProxyHandle) -> SseReader:
    resp = await s.get(f"{proxy.url}/ollamon/api/live")
    assert resp.status == 200
    return SseReader(resp)


async def test_frames_match_the_emulator(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, **FAST)
    async with aiohttp.ClientSession() as s:
        reader = await open_stream(s, proxy)
        first = await reader.next_frame()
        assert reader.fields[0] == ("retry", "2000")
        assert first["tiles"]["requests"] == 0 and first["tiles"]["error_rate"] is None
        assert first["version"] and first["seq"] == 0
        ok = [await generate(s, proxy.url, request_id=f"ok-{i}") for i in range(7)]
        bad = [
            await generate(s, proxy.url, emulate="error_status=500", request_id=f"bad-{i}") for i in range(3)
        ]
        assert ok == [200] * 7 and bad == [500] * 3
        await proxy.wait_rows(10)
        frame = await reader.frame_where(lambda f: f["tiles"]["requests"] == 10, what="10 requests")
        reader.close()
    truth = [e for e in emulator.emu.inference_entries() if e.request_id.startswith(("ok-", "bad-"))]
    assert len(truth) == 10
    t = frame["tiles"]
    failed = sum(1 for e in truth if e.status >= 400)
    assert t["failed"] == failed == 3
    assert t["error_rate"] == pytest.approx(failed / len(truth))
    # Rates over the last 10 s (the test took far less): everything counted, divided by 10 s.
    assert t["requests_per_s"] == pytest.approx(10 / 10)
    assert t["tokens_per_s"] == pytest.approx(sum(e.eval_count or 0 for e in truth) / 10)
    # p95s: over the successful requests, within the histogram's bound of the exact value of the stored rows.
    rows = [r for r in proxy.rows() if r["success"]]
    for figure, column in (("ttft_ms_p95", "ttft_ms"), ("response_time_ms_p95", "response_time_ms")):
        exact = exact_quantile(sorted(r[column] for r in rows), 0.95)
        assert exact is not None
        assert abs(t[figure] - exact) <= error_bound(exact), figure
    # The live chart buckets: the minutes by arrival hold every request, split by outcome.
    minutes = frame["minutes"]
    assert sum(m["requests"] for m in minutes) == 10
    assert sum(m["successful"] for m in minutes) == 7 and sum(m["failed"] for m in minutes) == 3
    # Recent rows: every request went out in some frame, once.
    sent = [r["request_id"] for f in reader.frames for r in f["requests"]]
    assert sorted(sent) == sorted(e.request_id for e in truth)
    row = next(r for f in reader.frames for r in f["requests"] if r["request_id"] == "bad-0")
    assert row["success"] is False and row["status_code"] == 500 and row["model_name"] == "llama3.2:latest"


async def test_live_minutes_match_the_stored_buckets(emulator: Any, make_proxy: MakeProxy) -> None:
    """The chart points a frame carries equal /ollamon/api/timeseries' 1-minute buckets of the stored rows."""
    proxy = await make_proxy(emulator.url, **FAST)
    async with aiohttp.ClientSession() as s:
        reader = await open_stream(s, proxy)
        for i in range(12):
            emulate = "error_status=503" if i % 4 == 0 else f"tokens={3 + i}"
            await generate(s, proxy.url, model="qwen3:0.6b" if i % 2 else "llama3.2", emulate=emulate)
        await proxy.wait_rows(12)
        frame = await reader.frame_where(lambda f: sum(m["requests"] for m in f["minutes"]) == 12)
        reader.close()
        metrics = "requests,successful,failed,cancelled,ttft_ms_p50,ttft_ms_p95,response_time_ms_p95,queue_time_ms_p95"
        url = f"{proxy.url}/ollamon/api/timeseries?metric={metrics}&bucket=1m&window=10m&exact=true"
        async with s.get(url) as resp:
            stored = {r["bucket"]: r for r in (await resp.json())["series"]}
    for m in frame["minutes"]:
        row = stored[iso_utc(m["bucket_start_s"])]
        for key in ("requests", "successful", "failed", "cancelled"):
            assert m[key] == row[key], key
        for key in ("ttft_ms_p50", "ttft_ms_p95", "response_time_ms_p95", "queue_time_ms_p95"):
            if row[key] is None:
                assert m[key] is None, key
            else:
                assert abs(m[key] - row[key]) <= error_bound(row[key]), key


async def test_in_flight_and_waiting_per_model(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, **FAST)
    async with aiohttp.ClientSession() as s:
        reader = await open_stream(s, proxy)
        # One request generating slowly, one stalled before its first token (waiting).
        slow = asyncio.ensure_future(generate(s, proxy.url, "qwen3:0.6b", "tokens=40;interval_ms=100", True))
        stalled = asyncio.ensure_future(generate(s, proxy.url, "llama3.2", "stall_ms=3000", True))

        def truth_busy() -> bool:
            entries = emulator.emu.inference_entries()
            return len(entries) == 2 and any(e.token_times for e in entries)

        await until(truth_busy, 10, "the emulator to have one request generating")
        frame = await reader.frame_where(
            lambda f: (
                f["live"].get("qwen3:0.6b", {}).get("generating") == 1
                and f["live"].get("llama3.2:latest", {}).get("waiting") == 1
            ),
            what="one generating, one waiting",
        )
        assert frame["live"]["qwen3:0.6b"] == {
            "in_flight": 1,
            "generating": 1,
            "waiting": 0,
            "loading": 0,
            "queued": 0,
        }
        assert frame["live"]["llama3.2:latest"]["in_flight"] == 1
        assert frame["tiles"]["in_flight"] == 2 and frame["tiles"]["waiting"] == 1
        assert await slow == 200 and await stalled == 200
        done = await reader.frame_where(lambda f: not f["live"], what="nothing in flight")
        reader.close()
        assert done["tiles"]["in_flight"] == 0


async def test_status_no_gpu_and_upstream_down(make_proxy: MakeProxy) -> None:
    # Nothing listens on the upstream port; sampling on, and no NVML on this machine (no GPU).
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    proxy = await make_proxy(dead, sampling__enabled=True, **FAST)
    async with aiohttp.ClientSession() as s:
        reader = await open_stream(s, proxy)
        frame = await reader.frame_where(
            lambda f: f["status"]["upstream"] is not None and f["system"]["latest"] is not None,
            what="a probe result and a sample",
        )
        reader.close()
    up = frame["status"]["upstream"]
    assert up["reachable"] is False and up["url"] == dead and "Connect" in up["error"]
    assert frame["status"]["db"] == "ok" and frame["status"]["redis"] == "disabled"
    assert frame["system"]["latest"]["gpus"] == []
    assert frame["system"]["gpu"]["state"] in ("unavailable", "starting")
    assert 0 <= frame["system"]["latest"]["cpu_percent"] <= 100


async def test_one_frame_per_tick_for_all_clients(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, **FAST)
    hub = proxy.app[HUB_KEY]
    async with aiohttp.ClientSession() as s:
        readers = [await open_stream(s, proxy) for _ in range(5)]
        await asyncio.gather(*(r.next_frame() for r in readers))
        start_frames, start = hub.frames, time.monotonic()
        for _ in range(5):
            got = await asyncio.gather(*(r.next_frame() for r in readers))
            assert len({f["time"] for f in got}) <= 2  # the same frames, not one computation each
        elapsed = time.monotonic() - start
        for r in readers:
            r.close()
    made = hub.frames - start_frames
    assert made <= elapsed / 0.1 + 2, (made, elapsed)


async def test_client_limit(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, dashboard__max_live_clients=2, **FAST)
    async with aiohttp.ClientSession() as s:
        a, b = await open_stream(s, proxy), await open_stream(s, proxy)
        async with s.get(f"{proxy.url}/ollamon/api/live") as resp:
            assert resp.status == 503
            assert "max_live_clients" in (await resp.json())["error"]
        a.resp.close()
        await until(lambda: len(proxy.app[HUB_KEY].clients) == 1, 5, "the closed stream to leave")
        c = await open_stream(s, proxy)
        await c.next_frame()
        await b.next_frame()
        b.close()
        c.close()


async def test_a_client_that_stops_reading_holds_one_frame(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, dashboard__live_interval_s=0.02)
    hub = proxy.app[HUB_KEY]
    host, port = proxy.host_port.split(":")
    # A raw socket with a tiny receive buffer (set before connecting, so the window stays small) that sends
    # the request and never reads.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _reader, writer_ = await asyncio.open_connection(sock=sock, limit=1024)
    writer_.write(f"GET /ollamon/api/live HTTP/1.1\r\nHost: {proxy.host_port}\r\n\r\n".encode())
    await writer_.drain()
    async with aiohttp.ClientSession() as s:
        good = await open_stream(s, proxy)
        await until(lambda: len(hub.clients) == 2, 5, "two streams")
        # Small kernel buffers on the server's side of that connection too, so the stall shows in seconds
        # (loopback would otherwise absorb megabytes first). The socket is real; only its size is set.
        local_port = sock.getsockname()[1]
        assert proxy.runner.server is not None
        for handler in proxy.runner.server.connections:
            transport = handler.transport
            if transport is not None and transport.get_extra_info("peername")[1] == local_port:
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Requests make frames bigger (recent rows), so the socket buffers fill sooner.
        for i in range(20):
            await generate(s, proxy.url, request_id=f"fill-{i}")
        await until(
            lambda: any(c.skipped > 20 for c in hub.clients), 30, "frames skipped for the stalled client"
        )
        stalled = max(hub.clients, key=lambda c: c.skipped)
        sent_then = stalled.sent
        await asyncio.sleep(0.5)
        assert stalled.sent == sent_then  # blocked on the socket: nothing more was written ...
        assert stalled.pending is not None and len(stalled.pending) < 64 * 1024  # ... and one frame held
        # The reading page is not held up by the stalled one.
        before = len(good.frames)
        for _ in range(5):
            await good.next_frame()
        assert len(good.frames) == before + 5
        good.close()
    writer_.close()


async def test_shutdown_ends_streams_at_once(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url, server__shutdown_grace_s=20, **FAST)
    async with aiohttp.ClientSession() as s:
        readers = [await open_stream(s, proxy) for _ in range(3)]
        await asyncio.gather(*(r.next_frame() for r in readers))
        start = time.monotonic()
        await proxy.stop()
        took = time.monotonic() - start
        for r in readers:
            with pytest.raises((EOFError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
                while True:
                    await r.next_frame(5)
    assert took < 10, took  # not the 20 s grace: the streams ended when shutdown began
