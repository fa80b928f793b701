"""The metrics a rule can name, what kind of data feeds each, and how each is computed.

One vocabulary (docs/metrics.md, "Names"): a request metric has the name, the unit and the definition of the
summary figure of the same name (``ttft_ms_p95`` in a rule is ``ttft_ms_p95`` in ``/ollamon/api/summary`` and
``ollamon stats``), over successful requests for latency and speed figures, with the one quantile method of
storage/histogram.py. Request metrics come from the records the writer stores (``InferenceRecord``; rows with
done_reason load/unload are model load calls, not inferences, and are skipped). Resource metrics come from
the sampler through ``AlertEngine.observe_system``. docs/alerts.md repeats this table for users.
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass

from storage.rollups import METRICS as FIELDS

__all__ = [
    "FIELDS",
    "METRICS",
    "RENAMED",
    "SYSTEM_METRICS",
    "MetricKind",
    "MetricSpec",
    "suggest",
]


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
    field: int = -1  # request figures of a column: its index in FIELDS
    stat: str = ""  # ... and which statistic: "avg" or a quantile such as "p95"

    @property
    def quantile(self) -> float | None:
        return int(self.stat[1:]) / 100 if self.stat.startswith("p") else None


_R, _G = MetricKind.REQUESTS, MetricKind.GAUGE


def _column(name: str, column: str, stat: str, unit: str) -> tuple[str, MetricSpec]:
    what = "mean" if stat == "avg" else f"{stat[1:]}th percentile"
    how = f"{what} of {column} over successful requests that have one"
    return name, MetricSpec(_R, unit, how, field=FIELDS.index(column), stat=stat)


# (figure name, column, statistic, unit): exactly the summary API's names (storage/queries.py FIGURES).
_COLUMN_FIGURES = (
    ("response_time_ms_avg", "response_time_ms", "avg", "ms"),
    ("response_time_ms_p50", "response_time_ms", "p50", "ms"),
    ("response_time_ms_p95", "response_time_ms", "p95", "ms"),
    ("response_time_ms_p99", "response_time_ms", "p99", "ms"),
    ("ttft_ms_avg", "ttft_ms", "avg", "ms"),
    ("ttft_ms_p50", "ttft_ms", "p50", "ms"),
    ("ttft_ms_p95", "ttft_ms", "p95", "ms"),
    ("ttft_ms_p99", "ttft_ms", "p99", "ms"),
    ("queue_time_ms_p50", "queue_time_ms", "p50", "ms"),
    ("queue_time_ms_p95", "queue_time_ms", "p95", "ms"),
    ("itl_ms_p50", "itl_mean_ms", "p50", "ms"),
    ("itl_ms_p95", "itl_mean_ms", "p95", "ms"),
    ("tokens_per_second_avg", "tokens_per_second", "avg", "tokens/s"),
    ("tokens_per_second_p50", "tokens_per_second", "p50", "tokens/s"),
)

METRICS: dict[str, MetricSpec] = {
    "error_rate": MetricSpec(_R, "ratio", "failed / requests; a cancelled request is not a failure"),
    "requests_per_s": MetricSpec(_R, "requests/s", "requests / window seconds"),
    "cancel_rate": MetricSpec(_R, "ratio", "cancelled (client left) / requests"),
    **dict(_column(*f) for f in _COLUMN_FIGURES),
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
    "quota_used_percent": MetricSpec(
        _G, "%", "highest used/limit share of any usage quota (docs/usage.md)", default_agg="last"
    ),
    "unsafe_rate": MetricSpec(
        _G, "ratio", "unsafe guard verdicts / analyses with a verdict, last 5 min (docs/content.md)"
    ),
    "pii_rate": MetricSpec(
        _G, "ratio", "analyses that found PII / analyses that checked for it, last 5 min (docs/content.md)"
    ),
    "records_dropped": MetricSpec(
        MetricKind.COUNTER, "records", "increase of the writer's dropped counter", default_agg="increase"
    ),
}

# Names rules used before the vocabulary was one: refused, with the name to use instead.
RENAMED: dict[str, str] = {
    "request_rate": "requests_per_s",
    "p50_response_time_ms": "response_time_ms_p50",
    "p95_response_time_ms": "response_time_ms_p95",
    "p99_response_time_ms": "response_time_ms_p99",
    "p95_ttft_ms": "ttft_ms_p95",
    "p95_queue_time_ms": "queue_time_ms_p95",
}

_STAT_FIRST = re.compile(r"^(p\d+|avg)_(.+)$")

# The keys observe_system() accepts (the sampler's flat dict).
SYSTEM_METRICS: tuple[str, ...] = tuple(n for n, s in METRICS.items() if s.kind is MetricKind.GAUGE)


def suggest(name: str) -> str | None:
    """The metric someone writing ``name`` most likely meant (``p95_ttft_ms`` -> ``ttft_ms_p95``), or None."""
    if name in RENAMED:
        return RENAMED[name]
    m = _STAT_FIRST.match(name)
    if m and f"{m.group(2)}_{m.group(1)}" in METRICS:
        return f"{m.group(2)}_{m.group(1)}"
    close = difflib.get_close_matches(name, METRICS, n=1, cutoff=0.75)
    return close[0] if close else None
