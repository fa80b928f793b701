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


def test_minute_quantiles_follow_every_new_record() -> None:
    """The minute's quantiles are kept between frames; a record added later must show in the next frame."""
    from storage.histogram import hist_quantile

    clock = Clock()
    f = LiveFigures(clock)
    clock.now = T0 + 2
    f.offer([rec(i, T0 + 1) for i in range(10)])
    first = f.minute_points(T0 + 3)[0]
    assert f.minute_points(T0 + 3)[0] == first  # nothing new: the same figures
    f.offer([rec(100 + i, T0 + 1, ttft_ms=5000.0, response_time_ms=9000.0) for i in range(10)])
    (m,) = f.minute_points(T0 + 4)
    bucket = f.minutes[int(T0)]
    for col, q in (("ttft_ms", 50), ("ttft_ms", 95), ("response_time_ms", 50), ("queue_time_ms", 95)):
        assert m[f"{col}_p{q}"] == hist_quantile(bucket.hists[col], q / 100)
    assert m["ttft_ms_p95"] > first["ttft_ms_p95"] and m["requests"] == 20


def test_window_totals_are_the_alert_windows_totals() -> None:
    """The tiles' window counts only every model together, yet must equal alerts/windows.py's totals."""
    import random

    from alerts.windows import RequestWindows

    rng = random.Random(7)
    clock = Clock()
    f = LiveFigures(clock)
    ref = RequestWindows([FIGURE_WINDOW_S])
    for sec in range(0, 600, 3):
        clock.now = T0 + sec
        batch = [
            rec(
                sec * 10 + i,
                clock.now - 1,
                model_name=rng.choice(["a:latest", "b:7b", None]),
                ttft_ms=rng.lognormvariate(5, 0.7),
                response_time_ms=rng.choice([None, rng.lognormvariate(7, 0.5)]),
                tokens_per_second=rng.uniform(5, 90),
                success=rng.random() > 0.1,
                cancelled=rng.random() < 0.05,
                done_reason=rng.choice(["stop", "stop", "load"]),
            )
            for i in range(rng.randint(0, 6))
        ]
        f.offer(batch)
        for r in batch:
            ref.add(r, clock.now)
        ref.advance(clock.now)
        ours, theirs = f.windows.totals(FIGURE_WINDOW_S), ref.totals(FIGURE_WINDOW_S)
        assert (ours.n, ours.failed, ours.cancelled) == (theirs.n, theirs.failed, theirs.cancelled)
        assert ours.field_n == theirs.field_n and ours.hists == theirs.hists
        assert ours.field_sum == pytest.approx(theirs.field_sum)
    assert list(f.windows._series) == [None]  # no per-model series: the tiles never read one


def test_compact_row_is_the_records_fields() -> None:
    from proxy.dashboard.figures import _ROW_FIELDS, compact_row

    r = rec(1, T0, success=False, status_code=500, error_message="x" * 1000, user_id="u")
    row = compact_row(r)
    assert list(row) == list(_ROW_FIELDS)
    assert {k: v for k, v in row.items() if k != "error_message"} == {
        k: getattr(r, k) for k in _ROW_FIELDS if k != "error_message"
    }
    assert row["error_message"] == "x" * 300 + "…"
