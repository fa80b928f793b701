"""The engine on a fake clock: window arithmetic, the state machine, cooldowns, grouping, multi-metric rules.

These drive ``AlertEngine.evaluate(now)`` directly with records and recorded sampler readings, so every
timing is exact; the HTTP-level acceptance tests are in test_alerts_proxy.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from alerts.engine import AlertEngine
from alerts.metrics import FIELDS, METRICS
from alerts.rules import parse_alerts
from alerts.windows import RequestWindows, column_figure
from storage.histogram import error_bound, exact_quantile
from storage.records import InferenceRecord

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def rec(
    model: str = "m", *, ok: bool = True, cancelled: bool = False, rt: float | None = 100.0, **kw: Any
) -> InferenceRecord:
    return InferenceRecord(
        timestamp="2027-01-15T08:00:00.000Z",
        request_id="r",
        model_name=model,
        success=ok and not cancelled,
        cancelled=cancelled,
        response_time_ms=rt,
        **kw,
    )


def engine(rules: list[dict[str, Any]], clock: Clock, resolve_delay_s: float = 0.0) -> AlertEngine:
    spec = parse_alerts(rules, {"log": {"type": "log"}}, "test", env={})
    return AlertEngine(spec, interval_s=1.0, resolve_delay_s=resolve_delay_s, clock=clock)


def sent(e: AlertEngine) -> int:
    return e.notifier.stats()["sent"]


# Recorded from `nvidia-smi --query-gpu=temperature.gpu,memory.used,utilization.gpu,power.draw` on an
# RTX 4090 under a long generation, one reading a second (memory as percent of 24 GiB).
GPU_TRACE_COOL = [
    {
        "gpu_temperature_c": 46.0,
        "gpu_memory_percent": 41.2,
        "gpu_utilization_percent": 3.0,
        "gpu_power_w": 31.5,
    },
    {
        "gpu_temperature_c": 47.0,
        "gpu_memory_percent": 41.2,
        "gpu_utilization_percent": 0.0,
        "gpu_power_w": 30.9,
    },
    {
        "gpu_temperature_c": 52.0,
        "gpu_memory_percent": 58.7,
        "gpu_utilization_percent": 61.0,
        "gpu_power_w": 188.2,
    },
]
GPU_TRACE_HOT = [
    {
        "gpu_temperature_c": 86.0,
        "gpu_memory_percent": 88.1,
        "gpu_utilization_percent": 99.0,
        "gpu_power_w": 421.7,
    },
    {
        "gpu_temperature_c": 87.0,
        "gpu_memory_percent": 88.1,
        "gpu_utilization_percent": 98.0,
        "gpu_power_w": 433.0,
    },
    {
        "gpu_temperature_c": 88.0,
        "gpu_memory_percent": 88.3,
        "gpu_utilization_percent": 99.0,
        "gpu_power_w": 440.2,
    },
]
SYSTEM = {"cpu_percent": 37.5, "memory_percent": 61.0, "disk_percent": 72.4}


def test_windows_percentiles_match_exact_values() -> None:
    rng = random.Random(5)
    w = RequestWindows([60])
    values = [rng.lognormvariate(5, 1.2) for _ in range(2000)]
    for v in values:
        w.add(rec(rt=v, ttft_ms=v / 3), T0)
    w.add(rec(ok=False, rt=1e6, ttft_ms=1e6), T0)  # a failure is no latency figure, as in the summary
    w.advance(T0)
    totals = w.totals(60)
    ordered = sorted(values)
    for q in ("p50", "p95", "p99"):
        exact = exact_quantile(ordered, int(q[1:]) / 100)
        assert exact is not None
        got = column_figure(totals, METRICS[f"response_time_ms_{q}"])
        assert got is not None and abs(got - exact) <= error_bound(exact)
        got = column_figure(totals, METRICS[f"ttft_ms_{q}"])
        assert got is not None and abs(got - exact / 3) <= error_bound(exact / 3)
    assert column_figure(totals, METRICS["queue_time_ms_p95"]) is None  # no queue_time_ms at all
    avg = column_figure(totals, METRICS["response_time_ms_avg"])
    assert avg == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_windows_expire_exactly_and_forget_idle_models() -> None:
    w = RequestWindows([10, 60])
    for i in range(60):  # one request a second, failing on even seconds
        w.add(rec("a", ok=i % 2 == 1), T0 + i)
    w.add(rec("b"), T0 + 59)
    w.advance(T0 + 59.5)
    assert w.totals(10, "a").n == 10 and w.totals(10, "a").failed == 5
    assert w.totals(60, "a").n == 60 and w.totals(60).n == 61
    assert sorted(w.models(10)) == ["a", "b"] and w.models(10, "b*") == ["b"]
    assert w.totals(60, "*").n == 61  # a glob merges models
    w.advance(T0 + 69.2)  # seconds 0..59 have left the 10 s window, 10..59 are in the 60 s one
    assert w.totals(10).n == 0 and w.totals(60, "a").n == 50
    w.advance(T0 + 200)
    assert w.models(60) == [] and w.totals(60).n == 0
    assert w.totals(60).hists == ({},) * len(FIELDS)  # subtraction leaves nothing behind


def test_load_calls_are_not_requests_and_cancellations_not_errors() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "errors",
                "when": {"metric": "error_rate", "window": "1m", "threshold": 0.2, "min_requests": 1},
            },
            {
                "name": "cancels",
                "when": {"metric": "cancel_rate", "window": "1m", "threshold": 0.2, "min_requests": 1},
            },
        ],
        clock,
    )
    e.offer([rec(done_reason="load", ok=False) for _ in range(5)])
    e.offer([rec(cancelled=True), rec(cancelled=True), rec(), rec()])
    e.requests.advance(clock.now)
    t = e.requests.totals(60)
    assert (t.n, t.failed, t.cancelled) == (4, 0, 2)


async def test_state_machine_for_and_resolve_delay() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "errs",
                "when": {"metric": "error_rate", "window": "10s", "threshold": 0.5, "min_requests": 2},
                "for": "3s",
                "cooldown": "1h",
            }
        ],
        clock,
        resolve_delay_s=2.0,
    )
    await e.evaluate()
    assert e.alerts == {}
    e.offer([rec(ok=False), rec(ok=False), rec()])
    states = []
    for _ in range(4):
        clock.now += 1
        await e.evaluate()
        states.append(e.alerts[("errs", "{}")].state)
    assert states == ["pending", "pending", "pending", "firing"]  # `for` is 3 s
    assert sent(e) == 1
    e.offer([rec() for _ in range(10)])  # now well under 50 %
    clock.now += 1
    await e.evaluate()
    assert e.alerts[("errs", "{}")].state == "firing"  # resolve delay not over
    clock.now += 2
    await e.evaluate()
    assert ("errs", "{}") not in e.alerts and sent(e) == 2  # resolved, and the resolution was sent


async def test_pending_that_recovers_never_notifies() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "errs",
                "when": {"metric": "error_rate", "window": "5s", "threshold": 0.5, "min_requests": 1},
                "for": "10s",
            }
        ],
        clock,
    )
    e.offer([rec(ok=False)])
    clock.now += 1
    await e.evaluate()
    assert e.alerts[("errs", "{}")].state == "pending"
    e.offer([rec(), rec(), rec()])
    clock.now += 1
    await e.evaluate()
    assert e.alerts == {} and sent(e) == 0


async def test_min_requests_guards_a_single_failure() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "errs",
                "when": {"metric": "error_rate", "window": "1m", "threshold": 0.5, "min_requests": 5},
            }
        ],
        clock,
    )
    e.offer([rec(ok=False)] * 4)
    clock.now += 1
    await e.evaluate()
    assert e.alerts == {}
    e.offer([rec(ok=False)])
    clock.now += 1
    await e.evaluate()
    assert e.alerts[("errs", "{}")].state == "firing"


async def test_cooldown_suppresses_refiring_and_repeats_after_it() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "errs",
                "when": {"metric": "error_rate", "window": "2s", "threshold": 0.5, "min_requests": 1},
                "cooldown": "60s",
            }
        ],
        clock,
    )

    async def tick(ok: bool) -> None:
        e.offer([rec(ok=ok)])
        clock.now += 1
        await e.evaluate()

    await tick(False)
    assert sent(e) == 1  # firing
    for _ in range(3):
        await tick(True)  # resolves (window 2 s)
    assert sent(e) == 2  # + resolved
    for _ in range(3):  # flaps back inside the cooldown: recorded, not announced
        await tick(False)
    assert e.alerts[("errs", "{}")].state == "firing" and sent(e) == 2
    clock.now += 60
    await tick(False)
    assert sent(e) == 3  # still firing once the cooldown is over: announced now
    for _ in range(5):
        await tick(False)
    assert sent(e) == 3
    clock.now += 60
    await tick(False)
    assert sent(e) == 4  # repeat after another cooldown


async def test_per_model_grouping_fires_only_for_the_slow_model() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "slow",
                "when": {"metric": "ttft_ms_p95", "window": "1m", "threshold": 1000, "min_requests": 3},
                "group_by": ["model"],
                "labels": {"team": "ml"},
            }
        ],
        clock,
    )
    e.offer([rec("fast", ttft_ms=40.0) for _ in range(20)])
    e.offer([rec("slow", ttft_ms=40.0 if i < 15 else 3000.0) for i in range(20)])
    clock.now += 1
    await e.evaluate()
    assert list(e.alerts) == [("slow", '{"model":"slow"}')]
    alert = e.alerts[("slow", '{"model":"slow"}')]
    assert alert.labels == {"team": "ml", "model": "slow"}
    assert alert.value == pytest.approx(3000, rel=0.011)
    states = {tuple(i["labels"].items()): i["state"] for i in e.rule_states()[0]["instances"]}
    assert states == {(("model", "fast"),): "inactive", (("model", "slow"),): "firing"}


async def test_all_of_gpu_temperature_and_latency_fires_only_when_both_hold() -> None:
    clock = Clock()
    e = engine(
        [
            {
                "name": "hot-and-slow",
                "when": {
                    "all": [
                        {"metric": "gpu_temperature_c", "window": "3s", "agg": "min", "threshold": 85},
                        {
                            "metric": "response_time_ms_p95",
                            "window": "5s",
                            "threshold": 2000,
                            "min_requests": 3,
                        },
                    ]
                },
            },
            {
                "name": "hot-or-slow",
                "when": {
                    "any": [
                        {"metric": "gpu_temperature_c", "window": "3s", "agg": "min", "threshold": 85},
                        {
                            "metric": "response_time_ms_p95",
                            "window": "5s",
                            "threshold": 2000,
                            "min_requests": 3,
                        },
                    ]
                },
            },
        ],
        clock,
    )

    async def second(sample: dict[str, float], latency_ms: float) -> set[str]:
        clock.now += 1
        e.observe_system({**sample, **SYSTEM, "not_a_metric": 1.0})
        e.offer([rec(rt=latency_ms) for _ in range(3)])
        await e.evaluate()
        return {rule for rule, _ in e.alerts}

    for sample in GPU_TRACE_HOT:  # hot GPU, fast requests
        assert await second(sample, 300.0) == {"hot-or-slow"}
    for sample in GPU_TRACE_COOL * 2:  # cool GPU, slow requests (the fast ones age out of the 5 s window)
        firing = await second(sample, 4000.0)
    assert firing == {"hot-or-slow"}
    for sample in GPU_TRACE_HOT:  # both
        firing = await second(sample, 4000.0)
    assert firing == {"hot-or-slow", "hot-and-slow"}
    a = e.alerts[("hot-and-slow", "{}")]
    assert a.values["gpu_temperature_c"] == 86.0  # min over the last 3 s
    assert a.values["response_time_ms_p95"] == pytest.approx(4000, rel=0.011)


async def test_gauges_absent_mean_no_data_and_counter_is_an_increase() -> None:
    clock = Clock()
    dropped = [0]
    spec = parse_alerts(
        [
            {"name": "cpu", "when": {"metric": "cpu_percent", "window": "5s", "threshold": 90}},
            {"name": "drops", "when": {"metric": "records_dropped", "window": "5s", "threshold": 0}},
        ],
        {},
        "test",
        env={},
    )
    e = AlertEngine(spec, interval_s=1.0, dropped=lambda: dropped[0], clock=clock)
    for _ in range(3):
        clock.now += 1
        e.observe_system({"cpu_percent": None, "gpu_temperature_c": float("nan")})  # type: ignore[dict-item]
        await e.evaluate()
    assert e.alerts == {}
    dropped[0] = 7
    clock.now += 1
    await e.evaluate()
    assert e.alerts[("drops", "{}")].value == 7.0
    for _ in range(6):  # no new drops for a whole window: the increase is 0 again
        clock.now += 1
        await e.evaluate()
    assert ("drops", "{}") not in e.alerts


async def test_unknown_data_holds_an_open_alert_only_while_windows_fill() -> None:
    clock = Clock()
    e = engine(
        [{"name": "hot", "when": {"metric": "gpu_temperature_c", "window": "10s", "threshold": 80}}], clock
    )
    from alerts.state import Alert

    e.alerts[("hot", "{}")] = Alert(
        rule="hot",
        fingerprint="{}",
        labels={},
        severity="warning",
        state="firing",
        restored=True,
        announced_at=T0 - 5,
    )
    clock.now += 5
    await e.evaluate()  # no readings yet, 5 s after start: held
    assert e.alerts[("hot", "{}")].state == "firing"
    clock.now += 6
    await e.evaluate()  # 11 s after start and still nothing: resolved
    assert e.alerts == {}
