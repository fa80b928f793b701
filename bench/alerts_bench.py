"""Alert evaluation cost: 100 rules over 10,000 requests/min, as a share of one CPU core.

Replays simulated time on a fake clock (so ten minutes take seconds): every 250 ms a writer batch of
records is offered to the engine (what ``Writer.add_listener`` does), every second a sampler reading
arrives, and every ``interval_s`` all rules are evaluated. CPU time (``time.process_time``) is measured
separately for window feeding and for evaluation and divided by the simulated seconds.

    python bench/alerts_bench.py [--minutes 10] [--rules 100] [--models 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts.engine import AlertEngine
from alerts.rules import parse_alerts
from storage.records import InferenceRecord

REQUEST_METRICS = [
    ("error_rate", 0.5),
    ("ttft_ms_p95", 50_000),
    ("response_time_ms_p99", 90_000),
    ("response_time_ms_p50", 60_000),
    ("queue_time_ms_p95", 60_000),
    ("cancel_rate", 0.9),
    ("tokens_per_second_avg", 0.001),  # op "<": never true
    ("requests_per_s", 100_000),
]
GAUGES = ["gpu_temperature_c", "gpu_memory_percent", "gpu_utilization_percent", "gpu_power_w", "cpu_percent", "memory_percent", "disk_percent"]  # fmt: skip
WINDOWS = ["1m", "5m", "15m"]


def make_rules(n: int) -> list[dict[str, Any]]:
    """A realistic mix: per-model and global request rules, resource rules, multi-condition rules."""
    rng = random.Random(1)
    rules: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 10
        if kind < 6:
            metric, threshold = REQUEST_METRICS[i % len(REQUEST_METRICS)]
            cond: dict[str, Any] = {
                "metric": metric,
                "window": rng.choice(WINDOWS),
                "op": "<" if metric == "tokens_per_second_avg" else ">",
                "threshold": threshold,
            }
            if metric != "requests_per_s":
                cond["min_requests"] = 20
            rule: dict[str, Any] = {"name": f"r{i}", "when": cond}
            if kind % 2 == 0:
                rule["group_by"] = ["model"]
            elif kind == 3:
                cond["model"] = "model-[0-4]*"
        elif kind < 8:
            rule = {"name": f"r{i}", "when": {"metric": rng.choice(GAUGES), "window": rng.choice(WINDOWS), "agg": rng.choice(["avg", "max"]), "threshold": 1000}}  # fmt: skip
        elif kind == 8:
            rule = {
                "name": f"r{i}",
                "when": {
                    "all": [
                        {"metric": "gpu_temperature_c", "window": "5m", "threshold": 85},
                        {
                            "metric": "response_time_ms_p95",
                            "window": "5m",
                            "threshold": 90_000,
                            "min_requests": 20,
                        },
                    ]
                },
                "group_by": "model",
            }
        else:
            rule = {"name": f"r{i}", "when": {"metric": "records_dropped", "window": "5m", "threshold": 0}}
        rule.update(notify=["log"], **{"for": "1m"})
        rules.append(rule)
    return rules


def record(rng: random.Random, models: int) -> InferenceRecord:
    rt = rng.lognormvariate(7, 0.8)
    cancelled = rng.random() < 0.01
    return InferenceRecord(
        timestamp="2027-01-15T08:00:00.000Z",
        request_id="x",
        model_name=f"model-{rng.randrange(models)}",
        success=rng.random() > 0.02 and not cancelled,
        cancelled=cancelled,
        response_time_ms=rt,
        ttft_ms=rt * rng.uniform(0.05, 0.3),
        queue_time_ms=rng.expovariate(1 / 20),
        tokens_per_second=rng.uniform(20, 120),
        done_reason="stop",
    )


async def run(rules_n: int, models: int, per_min: int, minutes: float, interval_s: float) -> dict[str, Any]:
    spec = parse_alerts(make_rules(rules_n), {"log": {"type": "log"}}, "bench", env={})
    now = [1_800_000_000.0]
    engine = AlertEngine(spec, interval_s=interval_s, clock=lambda: now[0], dropped=lambda: 0)
    rng = random.Random(7)
    step = 0.25  # the writer's flush interval
    per_batch = per_min / 60 * step
    feed_cpu = eval_cpu = 0.0
    evals = 0
    carry = 0.0
    steps = int(minutes * 60 / step)
    batches = [[record(rng, models) for _ in range(int(per_batch) + 1)] for _ in range(64)]  # pre-built
    next_eval = interval_s
    for i in range(1, steps + 1):
        now[0] += step
        carry += per_batch
        k = int(carry)
        carry -= k
        batch = batches[i % len(batches)][:k]
        t = time.process_time()
        engine.offer(batch)
        if i % 4 == 0:
            engine.observe_system({g: rng.uniform(20, 80) for g in GAUGES})
        feed_cpu += time.process_time() - t
        if i * step >= next_eval:
            next_eval += interval_s
            t = time.process_time()
            await engine.evaluate()
            eval_cpu += time.process_time() - t
            evals += 1
    simulated = steps * step
    return {
        "rules": rules_n,
        "models": models,
        "req_per_min": per_min,
        "interval_s": interval_s,
        "simulated_s": simulated,
        "feed_ms": feed_cpu * 1000,
        "eval_ms": eval_cpu * 1000,
        "per_eval_ms": eval_cpu * 1000 / max(1, evals),
        "core_pct": (feed_cpu + eval_cpu) / simulated * 100,
        "firing": engine.counts()["firing"] + engine.counts()["pending"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--models", type=int, default=10)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    cases = [
        (args.rules, args.models, 10_000, 5.0),  # the target
        (args.rules, args.models, 10_000, 1.0),
        (args.rules, args.models, 100_000, 5.0),
        (args.rules * 5, args.models, 10_000, 5.0),
    ]
    head = f"{'rules':>6} {'models':>6} {'req/min':>8} {'interval':>8} {'sim s':>6} {'feed ms':>8} {'eval ms':>8} {'ms/eval':>8} {'% core':>7}"
    print(head)
    print("-" * len(head))
    for rules_n, models, per_min, interval in cases:
        r = asyncio.run(run(rules_n, models, per_min, args.minutes, interval))
        print(
            f"{r['rules']:>6} {r['models']:>6} {r['req_per_min']:>8} {r['interval_s']:>7g}s {r['simulated_s']:>6.0f} "
            f"{r['feed_ms']:>8.1f} {r['eval_ms']:>8.1f} {r['per_eval_ms']:>8.2f} {r['core_pct']:>6.2f}%"
        )
    print("\ntarget: 100 rules over 10,000 requests/min (first row) under 5% of one core")


if __name__ == "__main__":
    main()
