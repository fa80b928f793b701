"""The metrics a rule can name, what kind of data feeds each, and how each is computed.

Request metrics come from the records the writer stores (``InferenceRecord``; rows with done_reason
load/unload are model load calls, not inferences, and are skipped). Resource metrics come from the
sampler through ``AlertEngine.observe_system``. docs/alerts.md repeats this table for users.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["HIST_FIELDS", "METRICS", "SYSTEM_METRICS", "MetricKind", "MetricSpec"]


class MetricKind(enum.Enum):
    REQUESTS = "request"  # from stored request records, per model
    GAUGE = "resource"  # from sampler readings (observe_system)
    PROBE = "probe"  # the upstream health probe, taken at each evaluation
    COUNTER = "counter"  # a monotonic counter: the value is its increase over the window


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: MetricKind
    unit: str
    how: str
    default_agg: str = "avg"
    percentile: float | None = None  # request percentiles: the quantile
    hist: int = -1  # request percentiles: which latency histogram (index into HIST_FIELDS)


# The latency fields kept as histograms per one-second bucket.
HIST_FIELDS: tuple[str, ...] = ("response_time_ms", "ttft_ms", "queue_time_ms")

_R, _G = MetricKind.REQUESTS, MetricKind.GAUGE

METRICS: dict[str, MetricSpec] = {
    "error_rate": MetricSpec(_R, "ratio", "failed / requests; a cancelled request is not a failure"),
    "request_rate": MetricSpec(_R, "requests/s", "requests / window seconds"),
    "cancel_rate": MetricSpec(_R, "ratio", "cancelled (client left) / requests"),
    "p50_response_time_ms": MetricSpec(_R, "ms", "median response_time_ms", percentile=0.50, hist=0),
    "p95_response_time_ms": MetricSpec(
        _R, "ms", "95th percentile of response_time_ms", percentile=0.95, hist=0
    ),
    "p99_response_time_ms": MetricSpec(
        _R, "ms", "99th percentile of response_time_ms", percentile=0.99, hist=0
    ),
    "p95_ttft_ms": MetricSpec(_R, "ms", "95th percentile of ttft_ms", percentile=0.95, hist=1),
    "p95_queue_time_ms": MetricSpec(_R, "ms", "95th percentile of queue_time_ms", percentile=0.95, hist=2),
    "tokens_per_second_avg": MetricSpec(_R, "tokens/s", "mean tokens_per_second of requests that have one"),
    "upstream_down": MetricSpec(
        MetricKind.PROBE, "0/1", "1 when GET / on the upstream fails or answers 5xx", default_agg="last"
    ),
    "gpu_temperature_c": MetricSpec(_G, "°C", "sampler reading (hottest GPU)"),
    "gpu_memory_percent": MetricSpec(_G, "%", "sampler reading"),
    "gpu_utilization_percent": MetricSpec(_G, "%", "sampler reading"),
    "gpu_power_w": MetricSpec(_G, "W", "sampler reading"),
    "cpu_percent": MetricSpec(_G, "%", "sampler reading"),
    "memory_percent": MetricSpec(_G, "%", "sampler reading"),
    "disk_percent": MetricSpec(_G, "%", "sampler reading"),
    "records_dropped": MetricSpec(
        MetricKind.COUNTER, "records", "increase of the writer's dropped counter", default_agg="increase"
    ),
}

# The keys observe_system() accepts (the sampler's flat dict).
SYSTEM_METRICS: tuple[str, ...] = tuple(n for n, s in METRICS.items() if s.kind is MetricKind.GAUGE)
