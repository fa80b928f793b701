"""bench/writer_bench.py still measures the whole pipeline and still checks that nothing was lost.

A smoke run, not a timing: a few hundred captures through the real app (emulator upstream, a private
redis-server, SQLite with rollups), then the bench's own check that every record reached the raw table, both
rollup tables and ``usage_hour`` with nothing dropped or lost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_writer_bench_runs_and_loses_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/writer_bench.py", "--records", "300", "--rounds", "1", "--breakdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "CHECK: ok" in out, out[-4000:]
    assert "| records/s, end to end |" in out
    for stage in ("build (worker thread)", "insert inference_metrics", "offer: AlertEngine", "Redis push"):
        assert stage in out, f"{stage!r} missing from the breakdown:\n{out[-4000:]}"
