"""The soak's flatness check (bench/soak.py, issue 15): first the criterion on synthetic series, flat and
leaking, so that it is known to fail when memory or fds creep; then a 60 s soak through real processes
(the emulator and ``ollamon serve``) with 50 streams, client aborts and upstream truncations."""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _soak() -> ModuleType:
    """bench/soak.py as a module (the bench scripts import their neighbour ``common`` by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("soak")


soak = _soak()


def series(rss: list[float], fds: list[int]) -> list[Any]:
    """Samples one second apart (``soak.Sample``; typed Any since the bench is loaded by path)."""
    return [soak.Sample(float(t), r, f, 50, 50 * t) for t, (r, f) in enumerate(zip(rss, fds, strict=True))]


def noisy(level: float, n: int, spread: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.uniform(-spread, spread) for _ in range(n)]


def test_a_flat_noisy_series_passes() -> None:
    rss = noisy(120.0, 60, 3.0)
    rss[45] += 40.0  # a busy machine's one-off spike is not a trend
    rss[:20] = [60 + 3 * i for i in range(20)]  # the warm-up climbs, and is excluded
    fds = [int(x) for x in noisy(120.0, 60, 2.0, seed=2)]
    assert soak.flatness_problems(series(rss, fds), 20.0, fds_baseline=20, fds_after=21) == []


def test_a_steady_rss_leak_fails() -> None:
    # 1 MiB/s (about 20 KiB per request at the soak's ~50 requests/s): the thirds' medians 13 MiB apart
    rss = [120.0 + 1.0 * t + x for t, x in enumerate(noisy(0.0, 60, 2.0))]
    problems = soak.flatness_problems(series(rss, [120] * 60), 20.0, fds_baseline=20, fds_after=20)
    assert len(problems) == 1 and problems[0].startswith("RSS grew"), problems


def test_fds_growing_under_load_fail() -> None:
    fds = [120 + t for t in range(60)]  # one socket or file kept per second
    problems = soak.flatness_problems(series([120.0] * 60, fds), 20.0, fds_baseline=20, fds_after=20)
    assert len(problems) == 1 and problems[0].startswith("fds grew under load"), problems


def test_fds_left_open_after_the_streams_close_fail_beyond_the_pool() -> None:
    flat = series([120.0] * 60, [120] * 60)
    left = soak.flatness_problems(flat, 20.0, fds_baseline=20, fds_after=60)
    assert len(left) == 1 and "did not return to the baseline" in left[0], left
    # Idle keep-alive connections to the upstream are the pool's, allowed up to one per stream ...
    pooled = soak.flatness_problems(flat, 20.0, fds_baseline=20, fds_after=60, pooled_after=40, max_pooled=51)
    assert pooled == []
    # ... but not beyond it, and not as cover for other fds.
    over = soak.flatness_problems(flat, 20.0, fds_baseline=20, fds_after=80, pooled_after=60, max_pooled=51)
    assert len(over) == 1 and "idle upstream connections" in over[0], over
    more = soak.flatness_problems(flat, 20.0, fds_baseline=20, fds_after=90, pooled_after=40, max_pooled=51)
    assert len(more) == 1 and "did not return to the baseline" in more[0], more


def test_too_few_samples_after_the_warm_up_fail() -> None:
    problems = soak.flatness_problems(series([120.0] * 10, [120] * 10), 8.0, fds_baseline=20, fds_after=20)
    assert problems and "too few" in problems[0]


def test_slope_per_hour_is_the_least_squares_fit_after_the_warm_up() -> None:
    rss = [500.0] * 10 + [100.0 + t / 60 for t in range(10, 70)]  # 1 MiB a minute once warm
    assert soak.slope_per_hour(series(rss, [0] * 70), 10.0) == pytest.approx(60.0)


@pytest.mark.timeout(420)
def test_a_60_s_soak_stays_flat_and_records_every_request(tmp_path: Path) -> None:
    opts = soak.Options(seconds=60, streams=50, sample_s=1.0, warmup_s=20.0, settle_s=20.0, out_dir=tmp_path)
    r = soak.run(opts)
    sent = sum(r.sent.values())
    assert r.sent["abort"] > 0 and r.sent["truncate"] > 0 and r.sent["close"] > 0, r.sent
    assert not r.client_errors, r.client_errors
    assert r.rows == sent, (r.rows, sent)
    assert not r.mismatches, (r.mismatches, r.examples)
    problems = soak.flatness_problems(
        r.samples, 20.0, r.fds_baseline, r.fds_after, r.pooled_after, max_pooled=opts.streams + 1
    )
    assert problems == [], (problems, r.fds_detail, soak.report(opts, r))
