"""Energy attribution: a recorded power trace and known overlapping requests against a hand computation,
shares that always sum to the total, and energy_j / gpu_memory_peak_mb through the real proxy."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.api.system import ENERGY_KEY, GPU_PROVIDER_KEY
from proxy.app import create_app, make_runner
from proxy.config import load_config
from proxy.resources.energy import EnergyMeter, EnergySpan
from proxy.resources.nvml import GpuProvider, GpuReading, GpuUnavailable
from tests.fixtures.gpu import RecordedProvider


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_requests_match_the_hand_computation() -> None:
    """Power 100 W from t=0, 200 W from 1 s, 50 W from 2 s, gone at 4 s; A=[0.5,2.5], B=[1.5,3.5],
    C=[3.0,3.2], D=[5,6]. Each instant's power is split equally among the requests alive then:

    [0.5,1) A alone 100 W -> A 50 | [1,1.5) A alone 200 W -> A 100 | [1.5,2) A+B 200 W -> 50 each
    [2,2.5) A+B 50 W -> 12.5 each | [2.5,3) B alone -> 25 | [3,3.2) B+C -> 5 each | [3.2,3.5) B -> 15
    A = 212.5 J, B = 107.5 J, C = 5 J (sum 325 J = 50 + 200 + 75 drawn while any ran); D: no GPU -> None.
    """
    clock = Clock()
    meter = EnergyMeter(clock=clock)
    spans: dict[str, EnergySpan] = {}
    script: list[tuple[float, str, Any]] = [
        (0.0, "power", (100.0, 1000.0)),
        (0.5, "begin", "A"),
        (1.0, "power", (200.0, 3000.0)),
        (1.5, "begin", "B"),
        (2.0, "power", (50.0, 2000.0)),
        (2.5, "end", "A"),
        (3.0, "begin", "C"),
        (3.2, "end", "C"),
        (3.5, "end", "B"),
        (4.0, "power", (None, None)),
        (5.0, "begin", "D"),
        (6.0, "end", "D"),
    ]
    for t, what, arg in script:
        clock.now = t
        if what == "power":
            meter.update(*arg)
        elif what == "begin":
            spans[arg] = meter.begin()
        else:
            meter.end(spans[arg])
    assert spans["A"].energy_j == pytest.approx(212.5)
    assert spans["B"].energy_j == pytest.approx(107.5)
    assert spans["C"].energy_j == pytest.approx(5.0)
    assert spans["D"].energy_j is None and spans["D"].memory_peak_mb is None
    assert meter.attributed_j == pytest.approx(325.0)
    assert sum(s.energy_j or 0.0 for s in spans.values()) == pytest.approx(meter.attributed_j)
    assert meter.total_j == pytest.approx(100 + 200 + 50 * 2)  # idle time [0,0.5) and [3.5,4) included
    # Peak memory: the reading in effect at arrival and every reading before the end.
    assert (spans["A"].memory_peak_mb, spans["B"].memory_peak_mb, spans["C"].memory_peak_mb) == (
        3000.0,
        3000.0,
        2000.0,
    )
    assert meter.in_flight == 0


def test_no_reading_ever_means_null_not_zero() -> None:
    clock = Clock()
    meter = EnergyMeter(clock=clock)
    span = meter.begin()
    clock.now = 2.0
    meter.update(None, None)
    clock.now = 3.0
    meter.end(span)
    assert span.energy_j is None and span.memory_peak_mb is None


def test_a_request_started_before_the_first_reading_counts_from_it() -> None:
    clock = Clock()
    meter = EnergyMeter(clock=clock)
    span = meter.begin()
    clock.now = 1.0
    meter.update(300.0, 500.0)
    clock.now = 1.5  # build() comes before the next sample: the last reading is extrapolated
    meter.end(span)
    assert span.energy_j == pytest.approx(150.0) and span.memory_peak_mb == 500.0


events = st.lists(
    st.tuples(
        st.floats(min_value=0.001, max_value=2.0),  # time step before the event
        st.sampled_from(["power", "begin", "end"]),
        st.one_of(st.none(), st.floats(min_value=0.0, max_value=700.0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_shares_always_sum_to_the_energy_drawn_while_requests_ran(script: list[Any]) -> None:
    clock = Clock()
    meter = EnergyMeter(clock=clock)
    open_spans: list[EnergySpan] = []
    closed: list[EnergySpan] = []
    busy_j = 0.0  # brute force: integrate P over the time at least one request was open
    power: float | None = None
    for step, what, watts in script:
        if power is not None and open_spans:
            busy_j += power * step
        clock.now += step
        if what == "power":
            meter.update(watts, None)
            power = watts
        elif what == "begin":
            open_spans.append(meter.begin())
        elif open_spans:
            span = open_spans.pop(len(open_spans) // 2)
            meter.end(span)
            closed.append(span)
    for span in open_spans:
        meter.end(span)
        closed.append(span)
    assert meter.attributed_j == pytest.approx(busy_j, rel=1e-9, abs=1e-9)
    assert sum(s.energy_j or 0.0 for s in closed) == pytest.approx(busy_j, rel=1e-9, abs=1e-9)
    assert all(s.energy_j is None or s.energy_j >= -1e-9 for s in closed)


# -- through the proxy ---------------------------------------------------------------------------

StartProxy = Callable[[str, GpuProvider], Awaitable[tuple[str, web.Application, Path]]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """The real app with a recorded GPU behind the provider seam (make_proxy cannot set it before start)."""
    runners: list[web.AppRunner] = []

    async def start(upstream: str, provider: GpuProvider) -> tuple[str, web.Application, Path]:
        db = tmp_path / f"p{len(runners)}.db"
        config = load_config(
            None,
            env={},
            overrides={
                ("server", "listen"): "127.0.0.1:0",
                ("server", "upstream"): upstream,
                ("storage", "db"): str(db),
                ("sampling", "interval_s"): 0.02,
            },
        )
        app = create_app(config)
        app[GPU_PROVIDER_KEY] = provider
        runner = make_runner(app, config)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app, db

    yield start
    for runner in runners:
        await runner.cleanup()


def _rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM inference_metrics ORDER BY id")]
    finally:
        con.close()


async def _wait_rows(db: Path, n: int) -> list[dict[str, Any]]:
    for _ in range(200):
        rows = _rows(db)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} rows, have {_rows(db)}")


async def test_energy_and_gpu_memory_on_rows_through_the_proxy(
    emulator: Any, start_proxy: StartProxy
) -> None:
    gpu = GpuReading(index=0, name="Recorded", power_w=200.0, memory_used_mb=5000.0, memory_total_mb=8000.0)
    url, app, db = await start_proxy(emulator.url, RecordedProvider([[gpu]]))
    meter = app[ENERGY_KEY]
    await asyncio.sleep(0.1)  # a few samples in
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 10}}
    async with aiohttp.ClientSession() as s:

        async def one(delay: float) -> None:
            await asyncio.sleep(delay)
            async with s.post(f"{url}/api/generate", json=body, headers={"X-Emulate": "interval_ms=25"}) as r:
                assert r.status == 200
                await r.read()

        began = time.monotonic()
        await asyncio.gather(one(0.0), one(0.08), one(0.16))
        spanned = time.monotonic() - began
    rows = await _wait_rows(db, 3)
    energies = [r["energy_j"] for r in rows]
    assert all(e is not None and e > 0 for e in energies)
    # Each request's share is at most the full power over its own lifetime, and the shares add up to
    # exactly what the meter saw drawn while any of them ran.
    for r in rows:
        assert r["energy_j"] <= 200.0 * r["response_time_ms"] / 1000.0 * 1.02
        assert r["gpu_memory_peak_mb"] == 5000.0
    assert sum(energies) == pytest.approx(meter.attributed_j, rel=1e-6)
    longest = max(r["response_time_ms"] for r in rows) / 1000.0
    # The requests' union lies within what the client timed around all three (a busy box stretches the
    # staggered starts, so the bound is measured, not the nominal 0.16 s of stagger).
    assert 200.0 * longest < meter.attributed_j <= 200.0 * spanned * 1.02


async def test_without_a_gpu_energy_and_memory_are_null(emulator: Any, start_proxy: StartProxy) -> None:
    missing = GpuUnavailable("NVML init failed: NVMLError_LibraryNotFound")
    url, _, db = await start_proxy(emulator.url, RecordedProvider([], open_errors=[missing] * 100))
    await asyncio.sleep(0.06)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/api/generate", json={"model": "llama3.2", "prompt": "hi"}) as r:
            assert r.status == 200
            await r.read()
    (row,) = await _wait_rows(db, 1)
    assert row["energy_j"] is None and row["gpu_memory_peak_mb"] is None
    assert row["success"] == 1
