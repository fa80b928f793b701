"""Acceptance: the real proxy in front of the emulator, real webhook receivers on loopback, real SQLite."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import hmac
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli import alerts as alerts_cli
from proxy.keys import ENGINE_KEY
from storage.migrations import MIGRATIONS, apply_migrations
from tests.alerts_helpers import generate, get_json, webhook_receiver
from tests.fixtures.proxy import MakeProxy, ProxyHandle

INTERVAL = 0.1


def epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def alert_config(rules: list[dict[str, Any]], channels: dict[str, Any]) -> dict[str, Any]:
    return {"alerts__interval_s": INTERVAL, "alerts__rules": rules, "alerts__channels": channels}


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "webhook",
        "url": url,
        "timeout": 1,
        "max_attempts": 3,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        **extra,
    }


ERROR_RULE: dict[str, Any] = {
    "name": "error-burst",
    "when": {"metric": "error_rate", "window": "3s", "op": ">", "threshold": 0.5, "min_requests": 4},
    "for": 0.5,
    "severity": "error",
    "cooldown": "1h",
    "description": "{value:.0%} of requests failed",
    "notify": ["hook"],
}


async def wait_state(
    session: aiohttp.ClientSession, proxy: ProxyHandle, state: str, within: float = 10.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while True:
        status, body = await get_json(session, f"{proxy.url}/ollamon/api/alerts?state={state}")
        assert status == 200
        if body["alerts"]:
            return list(body["alerts"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no {state} alert within {within} s")
        await asyncio.sleep(0.03)


async def test_error_burst_fires_once_and_resolves(emulator: Any, make_proxy: MakeProxy) -> None:
    async with webhook_receiver() as receiver:
        proxy = await make_proxy(
            emulator.url, **alert_config([ERROR_RULE], {"hook": hook(receiver.url, secret="s3cret")})
        )
        async with aiohttp.ClientSession() as s:
            statuses = [(await generate(s, proxy.url, emulate="error_status=500"))[0] for _ in range(6)]
            assert statuses == [500] * 6
            (firing,) = await receiver.wait_for(1, "firing")
            # Keep failing for a while: inside the cooldown nothing more is sent.
            for _ in range(10):
                await generate(s, proxy.url, emulate="error_status=500")
                await asyncio.sleep(0.05)
            await asyncio.sleep(5 * INTERVAL)
            assert len(receiver.hits) == 1
            (row,) = await wait_state(s, proxy, "firing")
            status, detail = await get_json(s, f"{proxy.url}/ollamon/api/alerts/{row['id']}")
            assert status == 200
            moves = [(t["from_state"], t["to_state"]) for t in detail["transitions"]]
            assert moves == [("inactive", "pending"), ("pending", "firing")]
            pending_at, firing_at = (epoch(t["at"]) for t in detail["transitions"])
            # Fired at the first evaluation after `for` (0.5 s) elapsed: within one interval (+ load slack).
            assert 0.5 <= firing_at - pending_at <= 0.5 + INTERVAL + 0.4
            # Traffic recovers: the failures age out of the 3 s window and the alert resolves, once.
            deadline = time.monotonic() + 15
            while not receiver.events("resolved") and time.monotonic() < deadline:
                await generate(s, proxy.url)
                await asyncio.sleep(0.1)
            (resolved,) = await receiver.wait_for(1, "resolved")
            await asyncio.sleep(5 * INTERVAL)
            assert [h.json["event"] for h in receiver.hits] == ["firing", "resolved"]
            (done,) = (await get_json(s, f"{proxy.url}/ollamon/api/alerts?state=resolved"))[1]["alerts"]
    assert firing["alert"]["rule"] == "error-burst" and firing["alert"]["severity"] == "error"
    assert firing["alert"]["value"] == 1.0 and firing["alert"]["threshold"] == 0.5
    assert firing["alert"]["message"] == "100% of requests failed"
    assert firing["version"] == 1 and firing["alert"]["id"] == row["id"]
    first = receiver.hits[0]
    expected = "sha256=" + hmac.new(b"s3cret", first.body, hashlib.sha256).hexdigest()
    assert first.headers["X-Ollamon-Signature"] == expected
    assert first.headers["X-Ollamon-Event"] == "firing"
    assert resolved["alert"]["state"] == "resolved" and resolved["alert"]["resolved_at"] is not None
    assert done["id"] == row["id"] and done["notification_count"] == 2 and done["last_error"] is None


async def test_latency_spike_fires_only_for_the_affected_model(emulator: Any, make_proxy: MakeProxy) -> None:
    rule = {
        "name": "slow-first-token",
        "when": {"metric": "ttft_ms_p95", "window": "5s", "threshold": 200, "min_requests": 3},
        "group_by": "model",
        "notify": ["hook"],
    }
    async with webhook_receiver() as receiver:
        proxy = await make_proxy(emulator.url, **alert_config([rule], {"hook": hook(receiver.url)}))
        async with aiohttp.ClientSession() as s:

            async def fast() -> None:
                for _ in range(6):
                    await generate(s, proxy.url, model="qwen3:0.6b")

            async def slow() -> None:
                for _ in range(4):
                    await generate(s, proxy.url, model="llama3.2", emulate="prompt_eval_ms=300")

            await asyncio.gather(fast(), slow())
            (firing,) = await receiver.wait_for(1, "firing")
            await asyncio.sleep(5 * INTERVAL)
            status, rules = await get_json(s, f"{proxy.url}/ollamon/api/alert-rules")
    assert len(receiver.hits) == 1
    assert firing["alert"]["labels"] == {"model": "llama3.2:latest"}  # the name Ollama resolves
    assert firing["alert"]["value"] > 300
    assert status == 200
    (info,) = rules["rules"]
    states = {i["labels"]["model"]: i["state"] for i in info["instances"]}
    assert states == {"qwen3:0.6b": "inactive", "llama3.2:latest": "firing"}
    assert info["state"] == "firing"
    fast = next(i for i in info["instances"] if i["labels"]["model"] == "qwen3:0.6b")
    assert fast["values"]["ttft_ms_p95"] is not None and fast["values"]["ttft_ms_p95"] < 200
    # Times are ISO-8601 UTC like everywhere else in the API, not Unix seconds.
    slow = next(i for i in info["instances"] if i["labels"]["model"] == "llama3.2:latest")
    assert slow["since"] == firing["alert"]["fired_at"] and fast["since"] is None
    evaluated = dt.datetime.fromisoformat(info["last_evaluated_at"])
    assert info["last_evaluated_at"].endswith("Z") and evaluated.utcoffset() == dt.timedelta(0)
    assert evaluated >= dt.datetime.fromisoformat(firing["alert"]["fired_at"])


# Recorded nvidia-smi readings (RTX 4090), one a second: idle-warm and under sustained load.
GPU_COOL = {
    "gpu_temperature_c": 52.0,
    "gpu_memory_percent": 58.7,
    "gpu_utilization_percent": 61.0,
    "gpu_power_w": 188.2,
}
GPU_HOT = {
    "gpu_temperature_c": 87.0,
    "gpu_memory_percent": 88.1,
    "gpu_utilization_percent": 98.0,
    "gpu_power_w": 433.0,
}
HOST = {"cpu_percent": 41.0, "memory_percent": 63.5, "disk_percent": 70.2}


async def test_all_of_gpu_heat_and_latency(emulator: Any, make_proxy: MakeProxy) -> None:
    rule = {
        "name": "hot-and-slow",
        "when": {
            "all": [
                {"metric": "gpu_temperature_c", "window": "1s", "agg": "min", "threshold": 85},
                {"metric": "response_time_ms_p95", "window": "2s", "threshold": 250, "min_requests": 2},
            ]
        },
        "notify": ["hook"],
    }
    async with webhook_receiver() as receiver:
        proxy = await make_proxy(emulator.url, **alert_config([rule], {"hook": hook(receiver.url)}))
        engine = proxy.app[ENGINE_KEY]
        sample = dict(GPU_HOT)

        async def sampler() -> None:
            while True:  # what the sampler does: one flat reading per tick
                engine.observe_system({**sample, **HOST})
                await asyncio.sleep(0.05)

        feeding = asyncio.ensure_future(sampler())
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(12):  # hot GPU, fast answers
                    await generate(s, proxy.url)
                    await asyncio.sleep(0.08)
                assert receiver.hits == [] and engine.counts()["firing"] == 0
                for _ in range(3):  # hot GPU and slow answers
                    await generate(s, proxy.url, emulate="prompt_eval_ms=300")
                (firing,) = await receiver.wait_for(1, "firing")
                sample.update(GPU_COOL)  # cool again, still slow: must resolve
                await receiver.wait_for(1, "resolved", within=5)
        finally:
            feeding.cancel()
    assert firing["alert"]["values"]["gpu_temperature_c"] == 87.0
    assert firing["alert"]["values"]["response_time_ms_p95"] > 250


async def test_failing_webhooks_retry_with_backoff_without_slowing_the_proxy(
    emulator: Any, make_proxy: MakeProxy
) -> None:
    async with webhook_receiver() as gone:
        gone_url = gone.url
    # `gone` is closed now: connection refused.
    async with webhook_receiver(status=500) as broken, webhook_receiver(delay_s=30) as slow:
        retry = {"max_attempts": 4, "backoff_initial": 0.1, "backoff_max": 0.3}
        channels = {
            "broken": hook(broken.url, **retry),
            "slow": hook(slow.url, **retry, timeout=0.3),
            "gone": hook(gone_url, **retry),
        }
        # The baseline's successes are in the window too: a low threshold keeps the test about delivery.
        rule = {
            **ERROR_RULE,
            "for": 0,
            "when": {**ERROR_RULE["when"], "threshold": 0.2},
            "notify": list(channels),
        }
        proxy = await make_proxy(emulator.url, **alert_config([rule], channels))
        async with aiohttp.ClientSession() as s:
            baseline = [(await generate(s, proxy.url))[1] for _ in range(15)]
            for _ in range(15):
                await generate(s, proxy.url, emulate="error_status=500")
            (row,) = await wait_state(s, proxy, "firing")
            during = [(await generate(s, proxy.url, emulate="error_status=500"))[1] for _ in range(15)]
            await broken.wait_for(4)
            await slow.wait_for(4)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                (row,) = (await get_json(s, f"{proxy.url}/ollamon/api/alerts?state=firing"))[1]["alerts"]
                if row["delivery_failures"] == 12:
                    break
                await asyncio.sleep(0.05)
            _, health = await get_json(s, f"{proxy.url}/ollamon/health")
    # Every attempt failed and was recorded on the alert; the last one says it gave up.
    assert row["delivery_failures"] == 12, row
    assert "gave up after 4 attempt(s)" in row["last_error"]
    assert health["alerts"]["notifications"]["failed"] == 3 and health["alerts"]["firing"] == 1
    assert health["alerts"]["notifications"]["retries"] == 9
    # Back-off: the waits between attempts grow (equal jitter: wait n is in [d_n / 2, d_n], d doubling).
    for receiver, extra in ((broken, 0.0), (slow, 0.3)):
        assert len(receiver.hits) == 4
        gaps = [b.at - a.at for a, b in zip(receiver.hits, receiver.hits[1:], strict=False)]
        for gap, low in zip(gaps, (0.05, 0.1, 0.15), strict=True):
            assert gap >= low + extra - 0.02, gaps
    # Delivery never ran on the request path: there each request would wait for the slow hook's 0.3 s timeout.
    # (A bound in multiples of a few-ms baseline failed once under a full suite with a core kept busy.)
    assert statistics.median(during) < statistics.median(baseline) + 0.2, (baseline, during)


async def test_restart_keeps_a_firing_alert_without_announcing_it_again(
    emulator: Any, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    db = tmp_path / "restart.db"
    rule = {**ERROR_RULE, "for": 0, "when": {**ERROR_RULE["when"], "window": "1m"}}
    async with webhook_receiver() as receiver:
        config = alert_config([rule], {"hook": hook(receiver.url)})
        first = await make_proxy(emulator.url, db=db, **config)
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                await generate(s, first.url, emulate="error_status=500")
            (before,) = await wait_state(s, first, "firing")
            await receiver.wait_for(1, "firing")
            await first.stop()
            second = await make_proxy(emulator.url, db=db, **config)
            engine = second.app[ENGINE_KEY]
            start = engine.evaluations
            for _ in range(200):  # ten evaluations after the restart
                if engine.evaluations >= start + 10:
                    break
                await asyncio.sleep(INTERVAL)
            assert engine.evaluations >= start + 10
            (after,) = await wait_state(s, second, "firing")
            _, rules = await get_json(s, f"{second.url}/ollamon/api/alert-rules")
            assert len(receiver.hits) == 1
            # Recovery after the restart resolves the reloaded alert, and that is announced.
            for _ in range(10):
                await generate(s, second.url)
            await receiver.wait_for(1, "resolved")
            _, detail = await get_json(s, f"{second.url}/ollamon/api/alerts/{before['id']}")
    assert after["id"] == before["id"] and after["notification_count"] == 1
    assert after["started_at"] == before["started_at"]
    assert rules["rules"][0]["last_value"] == {"error_rate": 1.0}  # the windows were refilled from SQLite
    assert [h.json["event"] for h in receiver.hits] == ["firing", "resolved"]
    moves = [(t["from_state"], t["to_state"]) for t in detail["transitions"]]
    assert moves == [("inactive", "firing"), ("firing", "resolved")]


async def test_api_errors_health_and_cli(
    emulator: Any, make_proxy: MakeProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = {**ERROR_RULE, "for": 0, "notify": ["log"]}
    proxy = await make_proxy(emulator.url, **alert_config([rule], {"log": {"type": "log"}}))
    async with aiohttp.ClientSession() as s:
        for bad in ("state=burning", "limit=0", "limit=abc"):
            status, body = await get_json(s, f"{proxy.url}/ollamon/api/alerts?{bad}")
            assert status == 400 and "bad parameter" in body["error"]
        assert (await get_json(s, f"{proxy.url}/ollamon/api/alerts/999"))[0] == 404
        assert (await get_json(s, f"{proxy.url}/ollamon/api/alerts/x"))[0] == 400
        _, body = await get_json(s, f"{proxy.url}/ollamon/api/alerts")
        assert body == {"state": "all", "alerts": []}
        for _ in range(5):
            await generate(s, proxy.url, emulate="error_status=503")
        (row,) = await wait_state(s, proxy, "firing")
        _, health = await get_json(s, f"{proxy.url}/ollamon/health")
        assert health["alerts"]["firing"] == 1 and health["alerts"]["rules"] == 1

        parser = argparse.ArgumentParser()
        alerts_cli.register(parser.add_subparsers())
        for argv in (
            ["alerts", "--firing", "--db", str(proxy.db_path)],
            ["alerts", "--firing", "--url", proxy.url],
        ):
            args = parser.parse_args(argv)
            assert await asyncio.to_thread(args.func, args) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0].split()[:4] == ["id", "state", "severity", "rule"]
            assert out[2].split()[:4] == [str(row["id"]), "firing", "error", "error-burst"]
            assert row["started_at"] in out[2]  # the stored ISO-8601 time, as the API gives it
        args = parser.parse_args(["alerts", "--state", "resolved", "--db", str(proxy.db_path)])
        assert args.func(args) == 0 and capsys.readouterr().out.strip() == "no resolved alerts"
    args = parser.parse_args(["alerts", "--db", str(proxy.db_path.parent / "missing.db")])
    assert args.func(args) == 1 and "no such database" in capsys.readouterr().err


def test_m004_from_the_previous_schema(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db")
    names = [m.__name__ for m in MIGRATIONS]
    previous = MIGRATIONS[: names.index("m004_alerts")]
    apply_migrations(conn, previous)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'alerts'").fetchone() == (0,)
    assert "m004_alerts" in apply_migrations(conn)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(alerts)")]
    assert columns == [
        "id", "rule", "fingerprint", "labels", "severity", "state", "value", "threshold", "message",
        "started_at", "fired_at", "resolved_at", "last_notified_at", "announced_at", "notification_count",
        "last_delivered_at", "delivery_failures", "last_error",
    ]  # fmt: skip
    transitions = [r[1] for r in conn.execute("PRAGMA table_info(alert_transitions)")]
    assert transitions == ["id", "alert_id", "at", "from_state", "to_state", "value"]
    conn.close()
