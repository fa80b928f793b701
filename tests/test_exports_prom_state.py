"""The scrape-time series: live requests per model, the sampler's host and GPU gauges, energy, alert states,
Redis and upstream up, and `promtool check metrics` on a real scrape.

The GPU is the one faked edge (no GPU here): a recorded NVML reading (tests/fixtures/gpu.py).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.api.system import GPU_PROVIDER_KEY
from proxy.exports.prom_records import ModelCap
from storage.tasks import spawn
from tests.fixtures.gpu import RecordedProvider
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy
from tests.fixtures.redis_server import RedisServer
from tests.prom_helpers import scrape, scrape_until

GPUS = [
    {"index": 0, "name": "Recorded H100", "temperature_c": 91.0, "power_w": 300.0, "memory_used_mb": 1000.0,
     "memory_total_mb": 80000.0, "utilization_percent": 50.0},
    {"index": 1, "name": "Recorded H100", "temperature_c": 40.0, "power_w": 100.0, "memory_used_mb": 0.0,
     "memory_total_mb": 80000.0, "utilization_percent": 0.0},
]  # fmt: skip
HOT_RULE = {
    "name": "gpu-hot",
    "when": {"metric": "gpu_temperature_c", "window": "1s", "op": ">", "threshold": 85},
    "severity": "critical",
    "notify": ["log"],
}


async def _post(url: str, body: dict[str, Any], emulate: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers={"X-Emulate": emulate}) as r:
        await r.read()
        return r.status


async def test_live_gauges_follow_requests_in_flight(emulator: Any, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(emulator.url)
    url = f"{proxy.url}/ollamon/metrics"
    gen = f"{proxy.url}/api/generate"
    waiting = spawn(
        _post(gen, {"model": "qwen3:0.6b", "prompt": "w"}, "stall_ms=1500;tokens=2"), name="waiting"
    )
    generating = spawn(
        _post(gen, {"model": "llama3.2", "prompt": "g"}, "tokens=60;interval_ms=30"), name="generating"
    )
    try:
        sc = await scrape_until(
            url,
            lambda sc: (
                sc.value("ollamon_waiting", model="qwen3:0.6b") == 1
                and sc.value("ollamon_generating", model="llama3.2:latest") == 1
            ),
        )
        assert sc.value("ollamon_in_flight", model="qwen3:0.6b") == 1
        assert sc.value("ollamon_in_flight", model="llama3.2:latest") == 1
        assert sc.value("ollamon_waiting", model="llama3.2:latest") == 0
        assert sc.value("ollamon_in_flight_all") == 2
    finally:
        assert await waiting == 200
        assert await generating == 200
    sc = await scrape_until(url, lambda sc: sc.value("ollamon_in_flight_all") == 0)
    assert sc.value("ollamon_in_flight") == 0


def test_live_models_share_the_cap() -> None:
    cap = ModelCap(2)
    assert [cap.label(m) for m in ("a", "b", "c", "a", None)] == ["a", "b", "other", "a", "other"]
    assert len(cap) == 2 and cap.overflowed == 2


async def test_sampler_energy_and_alert_series(emulator: Any, make_proxy: MakeProxy) -> None:
    def prepare(app: web.Application) -> None:
        app[GPU_PROVIDER_KEY] = RecordedProvider.from_dicts([GPUS])

    proxy = await make_proxy(
        emulator.url,
        prepare=prepare,
        sampling__interval_s=0.05,
        alerts__interval_s=0.1,
        alerts__rules=[HOT_RULE],
        alerts__channels={"log": {"type": "log"}},
    )
    url = f"{proxy.url}/ollamon/metrics"
    sc = await scrape_until(url, lambda sc: sc.value("ollamon_alert_state", rule="gpu-hot") == 2)
    assert sc.value("ollamon_alert_state", rule="gpu-hot", severity="critical") == 2
    assert sc.value("ollamon_alerts", rule="gpu-hot", state="firing") == 1
    assert sc.value("ollamon_alerts", rule="gpu-hot", state="pending") == 0
    for gpu in GPUS:
        i = str(gpu["index"])
        assert sc.value("ollamon_gpu_temperature_celsius", gpu=i) == gpu["temperature_c"]
        assert sc.value("ollamon_gpu_power_watts", gpu=i) == gpu["power_w"]
        assert sc.value("ollamon_gpu_memory_used_bytes", gpu=i) == gpu["memory_used_mb"] * 2**20
        assert sc.value("ollamon_gpu_memory_total_bytes", gpu=i) == gpu["memory_total_mb"] * 2**20
        assert sc.value("ollamon_gpu_utilization_percent", gpu=i) == gpu["utilization_percent"]
    for name in ("ollamon_cpu_percent", "ollamon_memory_percent", "ollamon_disk_percent"):
        (sample,) = sc.samples(name)
        assert 0.0 <= sample.value <= 100.0, name

    await _post(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "e"}, "tokens=20;interval_ms=10")
    (row,) = await proxy.wait_rows(1)
    assert row["energy_j"] is not None and row["energy_j"] > 0
    sc = await scrape_until(url, lambda sc: sc.value("ollamon_requests_total") == 1)
    assert sc.value("ollamon_energy_joules_total", model="llama3.2:latest") == pytest.approx(row["energy_j"])


async def test_redis_up_and_down(emulator: Any, make_proxy: MakeProxy, redis_server: RedisServer) -> None:
    proxy = await make_proxy(emulator.url, redis__url=redis_server.url, redis__timeout_ms=200)
    url = f"{proxy.url}/ollamon/metrics"
    await _post(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "r"}, "tokens=2")
    await scrape_until(url, lambda sc: sc.value("ollamon_redis_up") == 1)
    redis_server.stop()
    await _post(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "r"}, "tokens=2")
    sc = await scrape_until(url, lambda sc: sc.value("ollamon_redis_up") == 0)
    assert len(sc.samples("ollamon_redis_up")) == 1


async def test_upstream_down_is_zero(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(f"http://127.0.0.1:{free_port()}")
    sc = await scrape(f"{proxy.url}/ollamon/metrics")
    assert sc.value("ollamon_upstream_up") == 0
    assert sc.value("ollamon_database_up") == 1


async def test_promtool_accepts_a_real_scrape(emulator: Any, make_proxy: MakeProxy) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (Debian ships it)"

    def prepare(app: web.Application) -> None:
        app[GPU_PROVIDER_KEY] = RecordedProvider.from_dicts([GPUS])

    proxy = await make_proxy(
        emulator.url,
        prepare=prepare,
        sampling__interval_s=0.05,
        alerts__rules=[HOT_RULE],
        alerts__channels={"log": {"type": "log"}},
    )
    for emulate in ("tokens=3", "error_status=500"):
        await _post(
            f"{proxy.url}/api/chat",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "q"}]},
            emulate,
        )
        await _post(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "p"}, emulate)
    sc = await scrape_until(
        f"{proxy.url}/ollamon/metrics",
        lambda sc: sc.value("ollamon_requests_total") >= 4 and bool(sc.samples("ollamon_gpu_power_watts")),
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=sc.text.encode(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
