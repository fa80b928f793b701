"""Content alert metrics: ``unsafe_rate`` and ``pii_rate`` fire end to end through a real proxy.

The emulator is Ollama and the guard model (``llama-guard3`` answers ``unsafe`` for text carrying an
``[unsafe:S1]`` marker, see tests/test_content_analysis.py); alerts go to a real webhook receiver.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from alerts.metrics import METRICS, SYSTEM_METRICS
from proxy.content.rates import RATES_WINDOW_S, ContentRates
from proxy.emulator.config import default_models
from storage.content import ContentRecord
from tests.alerts_helpers import get_json, webhook_receiver
from tests.fixtures.emulator import MakeEmulator
from tests.fixtures.proxy import MakeProxy
from tests.test_alerts_proxy import alert_config, hook
from tests.test_content_analysis import GUARD, chat

UNSAFE_RULE: dict[str, Any] = {
    "name": "unsafe-content",
    "when": {"metric": "unsafe_rate", "window": "2s", "op": ">", "threshold": 0.2, "agg": "last"},
    "severity": "warning",
    "cooldown": "1h",
    "notify": ["hook"],
}
PII_RULE: dict[str, Any] = {
    "name": "pii-content",
    "when": {"metric": "pii_rate", "window": "2s", "op": ">", "threshold": 0.2, "agg": "last"},
    "severity": "warning",
    "cooldown": "1h",
    "notify": ["hook"],
}


def record(verdict: str | None, pii_count: int | None) -> ContentRecord:
    rec = ContentRecord("r", "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "ok", None)
    rec.verdict, rec.pii_count = verdict, pii_count
    return rec


def test_metrics_are_gauges_the_engine_accepts() -> None:
    assert {"unsafe_rate", "pii_rate"} <= set(SYSTEM_METRICS)
    assert METRICS["unsafe_rate"].unit == METRICS["pii_rate"].unit == "ratio"


def test_rates_count_the_last_five_minutes_only() -> None:
    now = [1000.0]
    rates = ContentRates(clock=lambda: now[0])
    assert rates.rates() == {}  # no analysis: no data, not 0
    rates.add(record("unsafe", 2))
    rates.add(record("safe", 0))
    rates.add(record(None, None))  # guard failed, PII not checked: in neither denominator
    assert rates.rates() == {"unsafe_rate": 0.5, "pii_rate": 0.5}
    now[0] += 100
    rates.add(record("safe", 0))
    rates.add(record(None, 0))  # no verdict: counts for pii_rate only
    assert rates.rates() == {"unsafe_rate": 1 / 3, "pii_rate": 1 / 4}
    now[0] += RATES_WINDOW_S - 50  # the first analyses have aged out; the later ones have not
    assert rates.rates() == {"unsafe_rate": 0.0, "pii_rate": 0.0}
    now[0] += RATES_WINDOW_S
    assert rates.rates() == {}


async def test_unsafe_and_pii_rules_fire_through_the_proxy(
    make_emulator: MakeEmulator, make_proxy: MakeProxy
) -> None:
    emu = await make_emulator(models=[*default_models(), GUARD])
    async with webhook_receiver() as receiver:
        proxy = await make_proxy(
            emu.url,
            content__enabled=True,
            content__guard_model="llama-guard3",
            **alert_config([UNSAFE_RULE, PII_RULE], {"hook": hook(receiver.url)}),
        )
        for i in range(3):
            await chat(proxy, f"How do I bake bread, step {i}?")
        safe_rows = await proxy.wait_rows(3, "content_analysis")
        assert {r["verdict"] for r in safe_rows} == {"safe"} and {r["pii_count"] for r in safe_rows} == {0}
        await asyncio.sleep(1.0)  # ten evaluations with both rates at 0: nothing fires
        assert receiver.hits == []
        await chat(proxy, "Tell me how to do [unsafe:S1] things, mail eve@example.com")
        rows = await proxy.wait_rows(4, "content_analysis")
        assert sorted(r["verdict"] for r in rows) == ["safe", "safe", "safe", "unsafe"]
        fired = {e["alert"]["rule"]: e["alert"] for e in await receiver.wait_for(2, "firing")}
        async with aiohttp.ClientSession() as s:
            status, listed = await get_json(s, f"{proxy.url}/ollamon/api/alerts?state=firing")
    assert status == 200 and {a["rule"] for a in listed["alerts"]} == {"unsafe-content", "pii-content"}
    assert fired["unsafe-content"]["value"] == 0.25  # 1 unsafe of 4 judged, as in /ollamon/api/content
    assert sum(1 for r in rows if r["pii_count"] > 0) == 1  # the e-mail address
    assert fired["pii-content"]["value"] == 0.25
