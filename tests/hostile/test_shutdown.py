"""Shutdown keeps to ``server.shutdown_grace_s``: streams still running at the grace are cut then (aiohttp's own
shutdown waits the grace twice, and forever when it is 0), recorded as cut by shutdown; shorter ones finish."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.keys import FORWARDER_KEY
from tests.fixtures.emulator import MakeEmulator
from tests.fixtures.proxy import MakeProxy
from tests.fixtures.serve import serve_subprocess

pytestmark = pytest.mark.timeout(90)

BODY = {"model": "llama3.2", "prompt": "x"}


async def _stream(
    s: aiohttp.ClientSession, url: str, emulate: str, started: asyncio.Event
) -> tuple[list[bytes], float]:
    """Lines received, and when (monotonic) the stream ended, cleanly or not."""
    lines: list[bytes] = []
    try:
        async with s.post(f"{url}/api/generate", json=BODY, headers={"X-Emulate": emulate}) as r:
            assert r.status == 200
            async for line in r.content:
                lines.append(line)
                started.set()
    except aiohttp.ClientError:
        pass
    return lines, time.monotonic()


def _done(lines: list[bytes]) -> bool:
    return bool(lines) and json.loads(lines[-1]).get("done") is True


async def test_sigterm_cuts_streams_at_the_grace_not_twice_it(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    emulator = await make_emulator(num_parallel=4)
    proc, url = await serve_subprocess(
        tmp_path, emulator.url, config="server:\n  shutdown_grace_s: 1\n", stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as s:
            long_started, short_started = asyncio.Event(), asyncio.Event()
            long = asyncio.ensure_future(_stream(s, url, "tokens=200; interval_ms=50", long_started))  # 10 s
            short = asyncio.ensure_future(
                _stream(s, url, "tokens=12; interval_ms=50", short_started)
            )  # 0.6 s
            await asyncio.wait_for(asyncio.gather(long_started.wait(), short_started.wait()), 10)
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            (long_lines, long_end), (short_lines, _) = await asyncio.gather(long, short)
        cut_s = long_end - sigterm_at
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    # aiohttp alone cut this at 2.0 s (twice the grace); a busy machine may add a little, never a whole grace.
    assert 0.9 < cut_s < 1.8, cut_s
    assert not _done(long_lines) and len(long_lines) < 100
    assert _done(short_lines), short_lines[-1:]
    con = sqlite3.connect(tmp_path / "sub.db")
    rows = con.execute("SELECT success, cancelled FROM inference_metrics ORDER BY success").fetchall()
    errors = [e for (e,) in con.execute("SELECT error_type FROM error_metrics")]
    con.close()
    # The cut one is ollamon's doing (forwarder.begin_shutdown ran first), not a client disconnect.
    assert rows == [(0, 0), (1, 0)], rows
    assert errors == ["shutdown"], errors


@pytest.mark.parametrize("grace_s", [0.0, 0.5])
async def test_grace_is_kept_in_process_and_begin_shutdown_comes_first(
    emulator: Any, make_proxy: MakeProxy, grace_s: float
) -> None:
    proxy = await make_proxy(emulator.url, server__shutdown_grace_s=grace_s)
    forwarder = proxy.app[FORWARDER_KEY]
    calls: list[tuple[float, int]] = []
    begin = forwarder.begin_shutdown

    def spy() -> None:
        calls.append((time.monotonic(), forwarder.in_flight))
        begin()

    forwarder.begin_shutdown = spy  # type: ignore[method-assign]
    async with aiohttp.ClientSession() as s:
        # An idle keep-alive connection must not hold the shutdown up.
        async with s.get(f"{proxy.url}/api/version") as r:
            assert r.status == 200
        started = asyncio.Event()
        stream = asyncio.ensure_future(_stream(s, proxy.url, "tokens=200; interval_ms=50", started))
        await asyncio.wait_for(started.wait(), 10)
        stop_at = time.monotonic()
        await proxy.stop()
        stopped_s = time.monotonic() - stop_at
        lines, end = await stream
    cut_s = end - stop_at
    # grace 0 means cut at once (aiohttp's own shutdown, given 0, never cuts at all).
    assert grace_s - 0.05 <= cut_s < grace_s + 0.6, cut_s
    assert stopped_s < grace_s + 1.5, stopped_s
    assert not _done(lines)
    assert len(calls) == 1 and calls[0][1] == 1, "begin_shutdown must run while the stream is still in flight"
    assert calls[0][0] - stop_at < 0.3
    (row,) = proxy.rows()
    assert row["success"] == 0 and row["cancelled"] == 0
    assert [e["error_type"] for e in proxy.rows("error_metrics")] == ["shutdown"]
