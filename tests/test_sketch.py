"""ollamon's one quantile method (storage/histogram.py) against exact quantiles, through each of its users.

The alert windows (alerts/windows.py) and the rollup summaries (storage/queries.py ``Acc``) must be the same
sketch: fed the same values they give the same number, and that number is within ``error_bound`` of the
exact quantile (the definition docs/metrics.md states, which the exact summaries and the per-request ITL
p95 compute directly).
"""

from __future__ import annotations

import random
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.metrics import FIELDS, METRICS
from alerts.windows import RequestWindows, column_figure
from storage.histogram import counts_of, error_bound, exact_quantile, hist_quantile
from storage.queries import Acc
from storage.records import InferenceRecord
from storage.rollups import RAW_COLUMNS

T0 = 1_800_000_000.0

values_lists = st.one_of(
    st.lists(st.floats(0.0, 1e7, allow_nan=False), min_size=1, max_size=300),
    st.builds(
        lambda mu, sigma, n, seed: [random.Random(seed).lognormvariate(mu, sigma) for _ in range(n)],
        st.floats(-3, 12),
        st.floats(0.01, 3),
        st.integers(1, 400),
        st.integers(0, 2**32),
    ),
    st.lists(st.sampled_from([0.0, 0.0005, 1.0, 100.0, 5000.0]), min_size=1, max_size=50),
)
QUANTILES = [(name, spec.quantile) for name, spec in METRICS.items() if spec.quantile is not None]


def _record(ttft: float) -> InferenceRecord:
    return InferenceRecord(
        timestamp="2027-01-15T08:00:00.000Z",
        request_id="r",
        model_name="m",
        success=True,
        cancelled=False,
        response_time_ms=ttft,
        ttft_ms=ttft,
        queue_time_ms=ttft,
        itl_mean_ms=ttft,
        tokens_per_second=ttft,
    )


def _raw_row(value: float) -> tuple[object, ...]:
    base: dict[str, object] = {c: None for c in RAW_COLUMNS}
    base.update(timestamp="2027-01-15T08:00:00.000Z", model_name="m", endpoint="/api/chat", success=1)
    base.update(cancelled=0, prompt_tokens=1, completion_tokens=1)
    base.update({m: value for m in FIELDS})
    return tuple(base[c] for c in RAW_COLUMNS)


@settings(max_examples=150, deadline=None)
@given(values_lists)
def test_alert_windows_and_rollup_summaries_are_one_sketch_within_the_bound(values: list[float]) -> None:
    windows = RequestWindows([60])
    rolled = Acc(exact=False)
    for v in values:
        windows.add(_record(v), T0)
        rolled.add_raw(_raw_row(v))
    windows.advance(T0)
    totals = windows.totals(60)
    ordered = sorted(values)
    for name, q in QUANTILES:
        assert q is not None
        spec = METRICS[name]
        column = FIELDS[spec.field]
        exact = exact_quantile(ordered, q)
        assert exact is not None
        alert = column_figure(totals, spec)
        summary = rolled.quantile(column, q)
        sketch = hist_quantile(counts_of(values), q)
        assert alert is not None and summary is not None
        assert alert == summary == sketch, (name, alert, summary, sketch)
        assert abs(alert - exact) <= error_bound(exact), (name, alert, exact)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=2, max_size=200))
def test_the_definition_is_linear_interpolation_between_ranks(values: list[float]) -> None:
    # The exact summaries and the per-request ITL p95 compute exact_quantile; it is numpy's default.
    ref = statistics.quantiles(values, n=100, method="inclusive")
    ordered = sorted(values)
    for q, k in ((0.5, 49), (0.95, 94), (0.99, 98)):
        got = exact_quantile(ordered, q)
        assert got is not None and abs(got - ref[k]) <= 1e-9 * max(1.0, abs(ref[k]))


def test_the_bound_is_tight_enough_to_fail() -> None:
    # A sketch that is off by 2% must fail the check above: the bound is 1% (+ 0.001 absolute).
    assert abs(1.02 * 1000.0 - 1000.0) > error_bound(1000.0)
    assert abs(0.0015 - 0.0) > error_bound(0.0)
