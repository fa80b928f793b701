"""Features that start independently are connected: resource samples reach the alert engine.

The GPU is the one edge faked here (no GPU on this machine): a recorded NVML reading stands in for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from proxy.api.system import GPU_PROVIDER_KEY
from tests.fixtures.gpu import RecordedProvider
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import MakeProxy


async def test_gpu_samples_drive_a_gpu_alert(emulator: Any, make_proxy: MakeProxy) -> None:
    hot = {
        "index": 0,
        "name": "Recorded H100",
        "temperature_c": 91.0,
        "power_w": 300.0,
        "memory_used_mb": 1000.0,
        "memory_total_mb": 80000.0,
        "utilization_percent": 50.0,
    }

    def prepare(app: web.Application) -> None:
        app[GPU_PROVIDER_KEY] = RecordedProvider.from_dicts([[hot]])

    rule = {
        "name": "gpu-hot",
        "when": {"metric": "gpu_temperature_c", "window": "1s", "op": ">", "threshold": 85},
        "severity": "critical",
        "notify": ["log"],
    }
    proxy = await make_proxy(
        emulator.url,
        prepare=prepare,
        sampling__interval_s=0.05,
        alerts__interval_s=0.1,
        alerts__rules=[rule],
        alerts__channels={"log": {"type": "log"}},
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(60):
            async with s.get(f"{proxy.url}/ollamon/api/alert-rules") as r:
                rules = await r.json()
            states = {x["name"]: x["state"] for x in (rules["rules"] if isinstance(rules, dict) else rules)}
            if states.get("gpu-hot") == "firing":
                break
            await asyncio.sleep(0.1)
    assert states["gpu-hot"] == "firing"


async def test_upstream_down_alert_fires_and_resolves(make_emulator: Any, make_proxy: MakeProxy) -> None:
    port = free_port()  # nobody listens here yet
    rule = {
        "name": "upstream-down",
        "when": {"metric": "upstream_down", "op": ">=", "threshold": 1},
        "severity": "critical",
        "notify": ["log"],
    }
    proxy = await make_proxy(
        f"127.0.0.1:{port}",
        alerts__interval_s=0.1,
        alerts__rules=[rule],
        alerts__channels={"log": {"type": "log"}},
    )

    async def state() -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/ollamon/api/alert-rules") as r:
            body = await r.json()
        rules = body["rules"] if isinstance(body, dict) else body
        return {x["name"]: x["state"] for x in rules}["upstream-down"]

    async def wait_for(wanted: str) -> str:
        got = ""
        for _ in range(80):
            got = await state()
            if got == wanted:
                break
            await asyncio.sleep(0.1)
        return got

    assert await wait_for("firing") == "firing"
    # Ollama comes back on that port: the probe sees it and the alert resolves.
    await make_emulator(port=port)
    assert await wait_for("inactive") in ("inactive", "resolved")
