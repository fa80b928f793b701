"""Exact summaries read on one connection or cut into time slices on several cores (storage/split_scan.py).

On the 1M-row database of bench/analytics_bench.py (build it once with ``--keep PATH``), each window's summary
is asked in pairs: with no helper thread (the caller's connection reads every group over the whole window),
then with ``--helpers`` (the window cut into that many + 1 slices, helpers on their own connections), each
on a fresh read-only connection as the API's reads open one per call. Medians over ``--pairs`` and the
median of the per-pair ratios (split / one connection), so a machine whose speed drifts during the run
compares like with like. ``--hog`` keeps one core busy with a spinning process meanwhile.

    python bench/analytics_bench.py --keep /tmp/q/bench.db --runs 1 --only "1 h summary"   # builds the file
    python bench/split_scan_bench.py --db /tmp/q/bench.db [--pairs 15] [--helpers 1] [--hog]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlite3

import storage.queries as queries
from storage import split_scan

WINDOWS = [
    ("1 h, exact=true", 3600.0, True),
    ("15 min (auto: exact)", 900.0, None),
    ("5 min (auto: exact)", 300.0, None),
]


def _newest(path: Path) -> float:
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        iso = conn.execute("SELECT MAX(timestamp) FROM inference_metrics").fetchone()[0]
    finally:
        conn.close()
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() + 0.001


def _timed(path: Path, helpers: int, since: float, until: float, exact: bool | None) -> float:
    split_scan.helpers = lambda: helpers  # type: ignore[assignment]
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        t = time.perf_counter()
        queries.summary(conn, since, until, exact=exact)
        return (time.perf_counter() - t) * 1000
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True, help="the database built by analytics_bench.py --keep")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--helpers", type=int, default=max(1, split_scan.helpers()))
    ap.add_argument("--hog", action="store_true", help="keep one core busy meanwhile")
    args = ap.parse_args()
    if not args.db.exists():
        sys.exit(f"{args.db}: no such file (build it with bench/analytics_bench.py --keep {args.db})")
    until = _newest(args.db)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    try:
        print(f"command: python {' '.join(sys.argv)}")
        print(f"cores: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()}; hog: {bool(hog)}\n")
        print(f"| window | one connection, ms | {args.helpers + 1} slices, ms | median ratio of pairs |")
        print("|---|---:|---:|---:|")
        for name, seconds, exact in WINDOWS:
            since = until - seconds
            _timed(args.db, 0, since, until, exact)
            _timed(args.db, args.helpers, since, until, exact)
            one, split, ratio = [], [], []
            for _ in range(args.pairs):
                a = _timed(args.db, 0, since, until, exact)
                b = _timed(args.db, args.helpers, since, until, exact)
                one.append(a)
                split.append(b)
                ratio.append(b / a)
            print(
                f"| {name} | {statistics.median(one):.1f} | {statistics.median(split):.1f} "
                f"| {statistics.median(ratio):.2f} |"
            )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
