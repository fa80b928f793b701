"""Faults between ollamon and Ollama (the emulator), injected by the TCP fault proxy in tests/faults.py.

Each test checks three things: what the client sees (a truncated stream is an aborted connection, never a
clean chunked end; a silent upstream is a 504 in Ollama's ``{"error": ...}`` shape), what the
inference_metrics / error_metrics rows say, and that every request is accounted for: requests seen =
rows written + rows dropped or lost (the writer's own counters).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, Literal

import aiohttp
import pytest

from tests.faults import FaultProxy
from tests.fixtures.emulator import RunningEmulator
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy, ProxyHandle

pytestmark = pytest.mark.timeout(60)

BODY = {"model": "llama3.2", "prompt": "why is the sky blue?"}
# Sampling off: the writer then carries only request records, so its counters account for requests alone.
QUIET = {"sampling__enabled": False}


async def assert_accounted(proxy: ProxyHandle, requests: int) -> list[dict[str, Any]]:
    """Every request the clients made became a row or was counted as dropped/lost; returns the rows."""
    rows = await proxy.wait_rows(requests)
    await asyncio.sleep(0.3)  # two flush intervals: a late extra row would show now
    rows = proxy.rows()
    stats = proxy.writer_stats
    assert len(rows) + stats["dropped"] + stats["lost"] == requests, (rows, stats)
    assert stats["written"] == len(rows) and stats["dropped"] == stats["lost"] == 0, stats
    return rows


class Partial:
    """A streamed answer read until it ends, cleanly or not."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.error: BaseException | None = None
        self.status = 0

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in bytes(self.data).split(b"\n")[:-1]]


async def read_stream(
    session: aiohttp.ClientSession,
    url: str,
    emulate: str,
    on_lines: tuple[int, Any] | None = None,
) -> Partial:
    """POST /api/generate; ``on_lines=(n, action)`` calls ``action()`` once ``n`` full lines are in."""
    out = Partial()
    try:
        async with session.post(f"{url}/api/generate", json=BODY, headers={"X-Emulate": emulate}) as r:
            out.status = r.status
            async for chunk in r.content.iter_any():
                out.data += chunk
                if on_lines is not None and out.data.count(b"\n") >= on_lines[0]:
                    on_lines[1]()
                    on_lines = None
    except aiohttp.ClientError as exc:
        out.error = exc
    return out


def error_rows(proxy: ProxyHandle) -> list[dict[str, Any]]:
    return proxy.rows("error_metrics")


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_upstream_cut_mid_stream_aborts_the_client_and_the_row_says_so(
    emulator: RunningEmulator, make_proxy: MakeProxy, how: Literal["reset", "close"]
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, **QUIET)
        async with aiohttp.ClientSession() as s:
            # Let the headers and a few lines through, then cut the TCP connection under the stream:
            # with a RST (upstream host gone) or a FIN (upstream process closed its socket).
            fp.truncate_after(700, how)
            cut = await read_stream(s, proxy.url, "tokens=40; interval_ms=10")
            fp.truncate_after(None)
            after = await read_stream(s, proxy.url, "tokens=3")
    # The client got a 200 whose body broke off: an error, not a clean end; no done line reached it.
    assert cut.status == 200 and isinstance(cut.error, aiohttp.ClientPayloadError), cut.error
    assert 0 < len(cut.data) < 700
    assert all(line["done"] is False for line in cut.lines)
    # ollamon did not reuse the broken connection: the next request went through whole.
    assert after.error is None and after.lines[-1]["done"] is True
    first, second = await assert_accounted(proxy, 2)
    assert first["success"] == 0 and first["status_code"] == 200
    assert first["error_message"].startswith("ollamon: upstream stream broke off")
    # ollamon's parser, like the client, counts whole lines only, so the row holds what the client could
    # parse; the slack is one token that an abort may drop from ollamon's unflushed socket buffer.
    seen = sum(len(line["response"]) for line in cut.lines)
    assert seen <= first["response_length"] < seen + 40, (seen, first["response_length"], first["metadata"])
    assert second["success"] == 1
    (err,) = error_rows(proxy)
    assert err["error_type"] == "upstream_closed" and err["request_id"] == first["request_id"]


async def test_upstream_reset_after_some_lines_cancels_the_generation(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, **QUIET)
        async with aiohttp.ClientSession() as s:
            cut = await read_stream(s, proxy.url, "tokens=200; interval_ms=10", on_lines=(3, fp.reset))
        assert fp.resets >= 1
    assert isinstance(cut.error, aiohttp.ClientPayloadError)
    assert 3 <= len(cut.lines) < 200 and not any(line["done"] for line in cut.lines)
    (row,) = await assert_accounted(proxy, 1)
    assert row["success"] == 0 and "broke off" in row["error_message"]
    # The emulator saw its client (the fault proxy) go: the generation stopped, it did not run on.
    await emulator.emu.ground_truth.wait_idle()
    (entry,) = emulator.emu.log
    assert entry.cancelled and entry.eval_count is not None and entry.eval_count < 200


async def test_latency_under_the_idle_timeout_is_recorded_not_failed(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, server__idle_timeout_s=1.0, **QUIET)
        async with aiohttp.ClientSession() as s:
            fp.latency_s = 0.15  # each way: the request arrives 0.15 s late, every answer chunk too
            slow = await read_stream(s, proxy.url, "tokens=10; interval_ms=20")
    assert slow.error is None and slow.lines[-1]["done"] is True and len(slow.lines) == 11
    (row,) = await assert_accounted(proxy, 1)
    assert row["success"] == 1
    # TTFT includes both delays; a delay line shifts the stream, so the gaps between tokens stay small.
    assert row["ttft_ms"] >= 300
    assert row["itl_mean_ms"] < 150


async def test_latency_past_the_idle_timeout_before_headers_gives_504(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, server__idle_timeout_s=0.3, **QUIET)
        fp.latency_s = 2.0
        async with aiohttp.ClientSession() as s:
            start = time.perf_counter()
            async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
                body = await r.json()
            took = time.perf_counter() - start
    assert r.status == 504 and r.headers["Content-Type"].startswith("application/json")
    assert set(body) == {"error"} and "within 0.3 s" in body["error"]
    assert 0.3 <= took < 1.8, took  # the timeout fired, not the latency running out
    (row,) = await assert_accounted(proxy, 1)
    assert row["status_code"] == 504 and row["success"] == 0
    (err,) = error_rows(proxy)
    assert err["error_type"] == "upstream_timeout"


async def test_stall_before_headers_gives_504_and_the_next_request_recovers(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, server__idle_timeout_s=0.3, **QUIET)
        async with aiohttp.ClientSession() as s:
            fp.stall()
            start = time.perf_counter()
            async with s.post(f"{proxy.url}/api/chat", json={**BODY, "messages": []}) as r:
                body = await r.json()
            took = time.perf_counter() - start
            assert fp.active >= 1  # the stall kept the sockets open: the 504 is ollamon's own timeout
            fp.pass_through()
            after = await read_stream(s, proxy.url, "tokens=3")
    assert r.status == 504 and set(body) == {"error"} and "no response from upstream" in body["error"]
    assert 0.3 <= took < 3.0
    assert after.error is None and after.lines[-1]["done"] is True
    rows = await assert_accounted(proxy, 2)
    assert [r["status_code"] for r in rows] == [504, 200]
    assert [e["error_type"] for e in error_rows(proxy)] == ["upstream_timeout"]


async def test_stall_mid_stream_is_cut_after_the_idle_timeout(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, server__idle_timeout_s=0.5, **QUIET)
        stalled_at: list[float] = []

        def stall() -> None:
            fp.stall()
            stalled_at.append(time.perf_counter())

        async with aiohttp.ClientSession() as s:
            cut = await read_stream(s, proxy.url, "tokens=100; interval_ms=10", on_lines=(3, stall))
            ended = time.perf_counter()
    assert isinstance(cut.error, aiohttp.ClientPayloadError)
    assert 3 <= len(cut.lines) < 100 and not any(line["done"] for line in cut.lines)
    # ollamon's idle clock starts at the last byte it got, a moment before the client saw it and stalled.
    assert 0.4 <= ended - stalled_at[0] < 4.0
    (row,) = await assert_accounted(proxy, 1)
    assert row["success"] == 0 and row["status_code"] == 200
    assert "sent nothing for 0.5 s" in row["error_message"]
    (err,) = error_rows(proxy)
    assert err["error_type"] == "upstream_timeout"


async def test_blackholed_upstream_gives_504_in_ollama_shape(
    emulator: RunningEmulator, make_proxy: MakeProxy
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, server__idle_timeout_s=0.3, **QUIET)
        fp.blackhole()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{proxy.url}/api/generate", json={**BODY, "stream": False}) as r:
                body = await r.json()
    assert r.status == 504 and set(body) == {"error"}
    assert emulator.emu.log == []  # nothing reached the upstream
    (row,) = await assert_accounted(proxy, 1)
    assert row["status_code"] == 504


async def _start_emulator_process(port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{port}",
        "--token-interval-ms", "10", "--prompt-eval-ms", "1",
        env={**os.environ, "OLLAMON_CONFIG": ""},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(f"http://127.0.0.1:{port}/api/version") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    proc.kill()
    await proc.wait()
    raise AssertionError("ollamon emulate did not come up")


async def test_upstream_process_killed_mid_stream(make_proxy: MakeProxy) -> None:
    port = free_port()
    proc = await _start_emulator_process(port)
    try:
        proxy = await make_proxy(f"127.0.0.1:{port}", **QUIET)
        async with aiohttp.ClientSession() as s:
            cut = await read_stream(
                s,
                proxy.url,
                "tokens=500; interval_ms=10",
                on_lines=(3, lambda: proc.send_signal(signal.SIGKILL)),
            )
            await proc.wait()
            async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
                gone = await r.json()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert isinstance(cut.error, aiohttp.ClientPayloadError)
    assert 3 <= len(cut.lines) < 500 and not any(line["done"] for line in cut.lines)
    assert r.status == 502 and set(gone) == {"error"}
    killed, refused = await assert_accounted(proxy, 2)
    assert killed["success"] == 0 and "broke off" in killed["error_message"]
    assert refused["status_code"] == 502
    assert [e["error_type"] for e in error_rows(proxy)] == ["upstream_closed", "upstream_unreachable"]


@pytest.mark.parametrize("fault", ["reset", "cut_in_head"])
async def test_upstream_gone_before_the_head_is_complete_gives_502(
    emulator: RunningEmulator, make_proxy: MakeProxy, fault: str
) -> None:
    async with FaultProxy(emulator.port) as fp:
        proxy = await make_proxy(fp.url, **QUIET)
        if fault == "reset":
            fp.reset()  # accepted, then RST: the request was sent into a dead connection
        else:
            fp.truncate_after(20, "close")  # "HTTP/1.1 200 OK\r\nCon" and a FIN
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{proxy.url}/api/generate", json=BODY) as r:
                body = await r.json()
    assert r.status == 502 and set(body) == {"error"} and "failed before answering" in body["error"]
    (row,) = await assert_accounted(proxy, 1)
    assert row["status_code"] == 502 and row["success"] == 0
    assert [e["error_type"] for e in error_rows(proxy)] == ["upstream_closed"]
