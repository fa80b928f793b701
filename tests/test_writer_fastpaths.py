"""The writer pipeline's cheaper paths (issue 15) give exactly what the per-record code they replace gave.

Each test keeps the old arithmetic here as the reference and compares on generated inputs, with ``==`` on
floats: the new code adds the same floats in the same order, so not even the last bit may differ.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
from types import SimpleNamespace
from typing import Any

from alerts.windows import RequestWindows, Totals, _Series, contribution
from proxy.dashboard.figures import MINUTES_KEPT, RECENT_KEPT, LiveFigures, MinuteBucket, compact_row
from proxy.forward import calibration, capture
from proxy.forward.streams import Flavor
from storage.histogram import exact_quantile
from storage.records import InferenceRecord, iso_utc

T0 = 1_800_000_000.0
MODELS = ["a:latest", "b:7b", "", None, "c:1b"]


def _record(rng: random.Random, i: int, at: float) -> InferenceRecord:
    def maybe(v: float) -> float | None:
        return None if rng.random() < 0.15 else v

    return InferenceRecord(
        timestamp=iso_utc(at),
        request_id=f"r{i}",
        model_name=rng.choice(MODELS),
        endpoint="/api/chat",
        success=rng.random() > 0.1,
        cancelled=rng.random() < 0.05,
        done_reason=rng.choice(["stop", "stop", "stop", "length", "load", None]),
        completion_tokens=rng.choice([None, rng.randint(0, 500)]),
        ttft_ms=maybe(rng.lognormvariate(5, 1.5)),
        response_time_ms=maybe(rng.lognormvariate(7, 1)),
        queue_time_ms=maybe(rng.choice([0.0, rng.expovariate(0.1)])),
        itl_mean_ms=maybe(rng.uniform(0, 80)),
        itl_p95_ms=maybe(rng.uniform(0, 200)),
        tokens_per_second=maybe(rng.uniform(1, 300)),
    )


def _state(t: Totals) -> tuple[Any, ...]:
    return t.n, t.failed, t.cancelled, list(t.field_n), list(t.field_sum), t.hists


def _old_add(w: RequestWindows, rec: InferenceRecord, at: float) -> None:
    """RequestWindows.add as the writer's listener called it before batches were folded."""
    c = contribution(rec)
    if c is None:
        return
    w.records += 1
    for key in (None, rec.model_name or ""):
        series = w._series.get(key)
        if series is None:
            series = w._series[key] = _Series(w.windows)
        series.add(int(at), c)


def test_a_folded_batch_leaves_the_same_windows_as_record_by_record() -> None:
    rng = random.Random(15)
    batched, single = RequestWindows([10, 60, 300]), RequestWindows([10, 60, 300])
    now, i = T0, 0
    for _ in range(300):
        now += rng.choice([0.0, 0.3, 1.0, 2.5, 40.0])
        batch: list[Any] = []
        for _ in range(rng.randint(0, 40)):
            i += 1
            batch.append(_record(rng, i, now - rng.uniform(0, 5)))
        batch.insert(rng.randint(0, len(batch)), object())  # not a record: ignored by both
        batched.add_batch(batch, now)
        for rec in batch:
            if isinstance(rec, InferenceRecord):
                _old_add(single, rec, now)
        if rng.random() < 0.3:
            batched.advance(now)
            single.advance(now)
        assert batched.records == single.records
        assert list(batched._series) == list(single._series)  # same series, created in the same order
        for key, series in single._series.items():
            other = batched._series[key]
            for w, rolling in series.rollings.items():
                assert _state(other.rollings[w].totals) == _state(rolling.totals), (key, w)
                assert [b.sec for b in other.rollings[w].buckets] == [b.sec for b in rolling.buckets]
    assert i > 3000


def _old_timings(times: list[float]) -> tuple[float, float | None, float]:
    gaps = sorted((b - a) * 1000.0 for a, b in itertools.pairwise(times))
    return sum(gaps) / len(gaps), exact_quantile(gaps, 0.95), gaps[-1]


def test_inter_token_figures_are_bit_for_bit_the_old_ones() -> None:
    rng = random.Random(16)
    for n in range(2000):
        start = rng.choice([0.0, 1e3, 1e6, 3e8]) + rng.random()
        scale = rng.choice([1e-6, 1e-3, 0.02, 1.0])
        times = [start]
        for _ in range(rng.randint(1, 300)):
            # Equal times (gaps of zero) and bursts too.
            times.append(times[-1] + rng.choice([0.0, rng.expovariate(1 / scale), scale]))
        cap = capture.Capture(
            endpoint="/api/generate",
            flavor=Flavor.GENERATE,
            request_id=f"r{n}",
            arrival=start - 0.1,
            arrival_wall=T0,
            client_addr=None,
            user_agent=None,
            user_id=None,
            store_text=False,
        )
        cap.content_times = times
        facts = SimpleNamespace(
            framing="ndjson",
            total_duration_ns=None,
            load_duration_ns=None,
            prompt_eval_duration_ns=None,
            eval_duration_ns=None,
            eval_count=None,
        )
        rec = InferenceRecord(timestamp=iso_utc(T0), request_id=f"r{n}", endpoint="/api/generate")
        capture._apply_timings(rec, cap, facts, None)  # type: ignore[arg-type]
        assert (rec.itl_mean_ms, rec.itl_p95_ms, rec.itl_max_ms) == _old_timings(times)


def _old_minute_add(
    minutes: dict[int, MinuteBucket], w: RequestWindows, rec: InferenceRecord, now: float
) -> None:
    c = contribution(rec)
    if c is None:
        return
    w.records += 1
    series = w._series.get(None)
    if series is None:
        series = w._series[None] = _Series(w.windows)
    series.add(int(now), c)
    arrived = dt.datetime.fromisoformat(rec.timestamp.replace("Z", "+00:00")).timestamp()
    start = int(arrived // 60 * 60)
    if start > now - 60 * MINUTES_KEPT:
        m = minutes.get(start)
        if m is None:
            m = minutes[start] = MinuteBucket(start)
        m.add(rec, c)


def test_live_figures_fold_batches_into_the_same_figures() -> None:
    rng = random.Random(17)
    now = T0
    f = LiveFigures(lambda: now)
    ref_windows = RequestWindows([300])
    ref_minutes: dict[int, MinuteBucket] = {}
    tokens = 0
    i = pruned = 0
    for _ in range(200):
        now += rng.choice([0.2, 1.0, 7.0, 61.0])
        batch: list[InferenceRecord] = []
        for _ in range(rng.randint(0, 30)):
            i += 1
            # Arrival up to 5 minutes back, some timestamps with an offset rather than Z.
            rec = _record(rng, i, now - rng.uniform(0, 300))
            if rng.random() < 0.1:
                rec.timestamp = rec.timestamp.replace("Z", "+00:00")
            batch.append(rec)
        f.offer(batch)
        if int(now) != pruned:  # offer prunes first, as LiveFigures._prune: subtraction order matters
            pruned = int(now)
            ref_windows.advance(now)
        for rec in batch:
            _old_minute_add(ref_minutes, ref_windows, rec, now)
            if rec.done_reason not in ("load", "unload"):
                tokens += rec.completion_tokens or 0
        ref_windows.advance(now)
        f.windows.advance(now)
        for start in [s for s in ref_minutes if s <= now - 60 * MINUTES_KEPT]:
            del ref_minutes[start]
        assert f.records == ref_windows.records
        assert _state(f.windows.totals(300)) == _state(ref_windows.totals(300))
        assert sorted(f.minutes) == sorted(ref_minutes)
        for start, m in ref_minutes.items():
            got = f.minutes[start]
            assert (got.requests, got.successful, got.failed, got.cancelled, got.completion_tokens) == (
                m.requests,
                m.successful,
                m.failed,
                m.cancelled,
                m.completion_tokens,
            )
            assert got.hists == m.hists
    assert f.seq == i
    assert sum(b[2] for b in f._rate) <= tokens


def test_totals_add_is_unchanged_for_single_records() -> None:
    """``add`` (the alert engine's restore path, one record at a time) counts what a batch of one counts."""
    rng = random.Random(18)
    one, folded = RequestWindows([60]), RequestWindows([60])
    for i in range(500):
        rec = _record(rng, i, T0)
        one.add(rec, T0 + i)
        folded.add_batch([rec], T0 + i)
        assert _state(one.totals(60, rec.model_name or "")) == _state(folded.totals(60, rec.model_name or ""))


def test_recent_rows_of_large_batches_are_the_newest_rows() -> None:
    """Rows of a batch larger than ``recent`` holds are numbered but not built: the rows kept are the same."""
    rng = random.Random(19)
    f = LiveFigures(lambda: T0)
    expected: list[tuple[int, dict[str, Any]]] = []
    i = 0
    for size in (
        0,
        1,
        RECENT_KEPT - 1,
        RECENT_KEPT,
        RECENT_KEPT + 1,
        3 * RECENT_KEPT,
        7,
        2 * RECENT_KEPT + 3,
    ):
        batch: list[Any] = []
        for _ in range(size):
            i += 1
            batch.append(_record(rng, i, T0 - rng.uniform(0, 30)))
            if rng.random() < 0.05:
                batch.append(object())  # not a record: no row, no number
        f.offer(batch)
        for rec in batch:
            if isinstance(rec, InferenceRecord):
                expected.append((len(expected) + 1, compact_row(rec)))
        assert list(f.recent) == expected[-RECENT_KEPT:]
        assert f.seq == len(expected) == i
        assert f.rows_after(i - 5) == [row for _, row in reversed(expected[-5:])]


def _old_fit(samples: list[tuple[int, int, int]]) -> tuple[float, float, float] | None:
    """calibration._fit as it was: a loop over the samples."""
    n = len(samples)
    mean_sq = sum(e * e for e, _, _ in samples) / n or 1.0
    weights = (calibration._RIDGE_RATIO * n * mean_sq, calibration._RIDGE * n, calibration._RIDGE * n)
    prior = (1.0, 0.0, 0.0)
    a = [[0.0] * 3 for _ in range(3)]
    b = [0.0] * 3
    for est, turns, exact in samples:
        x = (float(est), float(turns), 1.0)
        for i in range(3):
            b[i] += x[i] * exact
            for j in range(3):
                a[i][j] += x[i] * x[j]
    for i in range(3):
        a[i][i] += weights[i]
        b[i] += weights[i] * prior[i]
    beta = calibration._solve3(a, b)
    return None if beta is None else (beta[0], beta[1], beta[2])


def test_the_calibration_fit_is_bit_for_bit_the_loop() -> None:
    rng = random.Random(20)
    for _ in range(5000):
        big = rng.choice([0, 3, 400, 10**6, 10**12, 2**60])
        samples = []
        for _ in range(rng.randint(1, calibration.WINDOW)):
            est, turns = rng.randint(0, big), rng.randint(0, rng.choice([1, 6, 1000]))
            samples.append(
                (est, turns, max(0, round(rng.uniform(0.3, 3) * est + 4 * turns + rng.gauss(3, 20))))
            )
        assert calibration._fit(samples) == _old_fit(samples), samples


def test_completion_ratio_running_sums_are_the_window_sums() -> None:
    rng = random.Random(21)
    cal = calibration.Calibration()
    for i in range(3 * calibration.WINDOW + 7):
        est = rng.randint(0, 500)  # 0: not a completion sample
        cal.observe("m", estimate=10, turns=1, exact=12, completion=(est, rng.randint(0, 900)))
        window = cal._models["m"].completion
        if len(window) < calibration.MIN_SAMPLES:
            assert cal.completion_ratio("m") is None
            continue
        ratio = sum(x for _, x in window) / sum(e for e, _ in window)
        lo, hi = calibration._RATIO_RANGE
        expected = (ratio, len(window)) if lo <= ratio <= hi else None
        assert cal.completion_ratio("m") == expected, i
