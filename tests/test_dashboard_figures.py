"""The dashboard's in-memory figures (proxy/dashboard/figures.py) on a controlled clock: definitions and bounds."""

from __future__ import annotations

import statistics

import pytest

from proxy.dashboard.figures import FIGURE_WINDOW_S, RATE_WINDOW_S, LiveFigures
from storage.histogram import error_bound, exact_quantile
from storage.records import InferenceRecord, iso_utc

T0 = 1_800_000_000.0  # a whole minute


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def rec(i: int, at: float, **kw: object) -> InferenceRecord:
    fields: dict[str, object] = {
        "timestamp": iso_utc(at),
        "request_id": f"r{i}",
        "model_name": "m:latest",
        "endpoint": "/api/chat",
        "completion_tokens": 10,
        "ttft_ms": 100.0 + i,
        "response_time_ms": 1000.0 + 10 * i,
        "queue_time_ms": float(i),
        **kw,
    }
    return InferenceRecord(**fields)  # type: ignore[arg-type]


def test_definitions() -> None:
    clock = Clock()
    f = LiveFigures(clock)
    clock.now = T0 + 5
    ok = [rec(i, T0 + 1) for i in range(20)]
    failed = [rec(100 + i, T0 + 1, success=False, status_code=500, ttft_ms=None) for i in range(4)]
    cancelled = [rec(200, T0 + 1, success=False, cancelled=True, completion_tokens=3)]
    load = [rec(300, T0 + 1, done_reason="load", completion_tokens=0)]
    f.offer([*ok, *failed, *cancelled, *load])
    t = f.tiles(T0 + 6)
    assert t["requests"] == 25  # the load call is not an inference
    assert t["failed"] == 4 and t["cancelled"] == 1
    assert t["error_rate"] == pytest.approx(4 / 25)  # a cancellation is not an error
    assert t["requests_per_s"] == pytest.approx(25 / RATE_WINDOW_S)
    assert t["tokens_per_s"] == pytest.approx((20 * 10 + 4 * 10 + 3) / RATE_WINDOW_S)
    exact = exact_quantile(sorted(r.ttft_ms for r in ok if r.ttft_ms is not None), 0.95)
    assert exact is not None and abs(t["ttft_ms_p95"] - exact) <= error_bound(exact)
    # The recent rows include the load call, newest first.
    rows = f.rows_after(0)
    assert len(rows) == 26 and rows[0]["request_id"] == "r300"
    assert f.rows_after(f.seq) == []
    # The minute bucket by arrival: rates over the part of the minute that passed (6 s).
    (m,) = f.minute_points(T0 + 6)
    assert m["bucket_start_s"] == T0 and m["requests"] == 25 and m["successful"] == 20
    assert m["requests_per_s"] == pytest.approx(25 / 6)
    med = statistics.median(r.queue_time_ms for r in ok if r.queue_time_ms is not None)
    assert m["queue_time_ms_p95"] is not None and m["queue_time_ms_p95"] > med
    # Later: the 10 s rate empties, the 5 min window still holds them, then lets go too.
    t = f.tiles(T0 + 5 + RATE_WINDOW_S + 1)
    assert t["requests_per_s"] == 0 and t["requests"] == 25
    t = f.tiles(T0 + 5 + FIGURE_WINDOW_S + 1)
    assert t["requests"] == 0 and t["error_rate"] is None and t["ttft_ms_p95"] is None
    assert f.minute_points(T0 + 5 + FIGURE_WINDOW_S + 1) == []


def test_memory_stays_bounded_without_pages() -> None:
    """No page open means tiles() is never called: the listener alone must let go of old data."""
    clock = Clock()
    f = LiveFigures(clock)
    for sec in range(3 * 3600):
        clock.now = T0 + sec
        f.offer([rec(sec, clock.now)])
    assert len(f._rate) <= RATE_WINDOW_S + 1
    assert len(f.minutes) <= 4
    assert len(f.recent) == 200
    series = f.windows._series[None]
    assert len(series.rollings[FIGURE_WINDOW_S].buckets) <= FIGURE_WINDOW_S + 1


def test_a_bad_record_never_raises() -> None:
    f = LiveFigures(Clock())
    f.offer([rec(1, T0, timestamp="not a time"), object(), rec(2, T0)])
    assert f.records == 2 and f.minute_points(T0 + 1)[0]["requests"] == 1
