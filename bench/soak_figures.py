"""The soak's figures (bench/soak.py): its samples and result, the flatness criterion, the summary table
and the plot. Kept apart from the load and the processes so that tests/test_soak.py can check the criterion on
synthetic series, and so that the proxy never imports matplotlib (it is imported inside ``plot`` only)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Options", "Result", "Sample", "flatness_problems", "plot", "report", "slope_per_hour"]


@dataclass
class Options:
    seconds: float = 3600.0
    streams: int = 50
    abort_pct: float = 10.0
    truncate_pct: float = 5.0
    sample_s: float = 5.0
    warmup_s: float | None = None  # None: a sixth of the run, at most 300 s
    tokens: tuple[int, int] = (10, 30)
    interval_ms: float = 50.0
    settle_s: float = 90.0  # how long to wait for the fds to return to the baseline after the streams close
    out_dir: Path | None = None
    seed: int = 15

    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(300.0, self.seconds / 6)


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    in_flight: int
    sent: int


@dataclass
class Result:
    samples: list[Sample]
    fds_baseline: int
    fds_after: int
    rss_after_mib: float
    sent: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    pooled_after: int = 0  # idle keep-alive connections to the upstream among fds_after
    fds_detail: str = ""
    late_aborts: set[str] = field(default_factory=set)
    abort_times: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    mismatches: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def flatness_problems(
    samples: Sequence[Sample],
    warmup_s: float,
    fds_baseline: int,
    fds_after: int,
    pooled_after: int = 0,
    max_pooled: int = 0,
    rss_tolerance_mib: float = 8.0,
    fds_tolerance: int = 8,
) -> list[str]:
    """Why the series is not flat (empty when it is): the median RSS of the last third of the post-warm-up
    samples above the middle third's by more than ``rss_tolerance_mib``, the same for fds under load, or
    fds after the streams closed above the idle baseline. Medians of thirds, not a fitted slope, so that a
    busy machine's spikes and the allocator's steps do not fail a flat run, while a leak of any steady
    rate shows as a gap between the thirds that grows with the run.

    ``pooled_after`` idle keep-alive connections to the upstream are allowed on top of the baseline, up to
    ``max_pooled`` (one per concurrent stream): ollamon's UpstreamPool keeps them for the next request
    (proxy/forward/upstream_client.py, at most ``max_idle``) until the upstream closes them."""
    post = [s for s in samples if s.t_s >= warmup_s]
    if len(post) < 6:
        return [f"only {len(post)} samples after the {warmup_s:g} s warm-up: too few to judge"]
    third = len(post) // 3
    middle, last = post[third : 2 * third], post[2 * third :]
    problems = []
    rss_m = statistics.median(s.rss_mib for s in middle)
    rss_l = statistics.median(s.rss_mib for s in last)
    if rss_l - rss_m > rss_tolerance_mib:
        problems.append(f"RSS grew: median {rss_m:.1f} MiB in the middle third, {rss_l:.1f} MiB in the last")
    fds_m = statistics.median(s.fds for s in middle)
    fds_l = statistics.median(s.fds for s in last)
    if fds_l - fds_m > fds_tolerance:
        problems.append(f"fds grew under load: median {fds_m:g} in the middle third, {fds_l:g} in the last")
    if pooled_after > max_pooled:
        problems.append(f"{pooled_after} idle upstream connections after close, more than {max_pooled}")
    if fds_after - pooled_after > fds_baseline + fds_tolerance:
        problems.append(
            f"fds did not return to the baseline: {fds_baseline} idle before, {fds_after} after "
            f"({pooled_after} of them pooled upstream connections)"
        )
    return problems


def slope_per_hour(samples: Sequence[Sample], warmup_s: float) -> float:
    """Least-squares RSS slope in MiB per hour over the post-warm-up samples."""
    post = [s for s in samples if s.t_s >= warmup_s]
    if len(post) < 2:
        return 0.0
    return statistics.linear_regression([s.t_s for s in post], [s.rss_mib for s in post]).slope * 3600


def plot(r: Result, warmup_s: float, png: Path, title: str) -> None:
    """RSS and fds over time, the warm-up shaded, the idle fd baseline dashed and the readings after the
    streams closed as dots (matplotlib's Agg backend: no display needed)."""
    samples = r.samples
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    ax1.plot(minutes, [s.rss_mib for s in samples], color="tab:blue", lw=1)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_ylim(bottom=0)
    ax2.plot(minutes, [s.fds for s in samples], color="tab:orange", lw=1)
    end = samples[-1].t_s / 60 if samples else 0.0
    ax1.plot([end], [r.rss_after_mib], "o", color="tab:blue", ms=4, label="after the streams closed")
    ax2.plot([end], [r.fds_after], "o", color="tab:orange", ms=4, label="after the streams closed")
    ax2.axhline(r.fds_baseline, color="0.4", ls="--", lw=0.8, label="idle before the load")
    ax2.legend(loc="center", fontsize=8)
    ax2.set_ylabel("open fds")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("minutes")
    for ax in (ax1, ax2):
        ax.axvspan(0, warmup_s / 60, color="0.9", label="warm-up")
        ax.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def report(opts: Options, r: Result, rss_tol: float = 8.0, fds_tol: int = 8) -> str:
    """The markdown summary table (the figures after the warm-up) and what did not match."""
    warm = opts.warmup()
    post = [s for s in r.samples if s.t_s >= warm] or r.samples
    rss = [s.rss_mib for s in post]
    loaded = [s.fds for s in post]
    sent = sum(r.sent.values())
    cut = r.sent["truncate"] + r.sent["close"]
    lines = [
        f"# {opts.streams} streams for {opts.seconds:g} s, {opts.abort_pct:g} % client aborts, "
        f"{opts.truncate_pct:g} % upstream truncations; warm-up {warm:g} s excluded; sample every {opts.sample_s:g} s",
        "",
        "| figure | value |",
        "|---|---|",
        f"| RSS after warm-up: start / end / max (MiB) | {rss[0]:.1f} / {rss[-1]:.1f} / {max(rss):.1f} |",
        f"| RSS slope, least squares after warm-up (MiB/hour) | {slope_per_hour(r.samples, warm):+.2f} |",
        f"| RSS after the streams closed (MiB) | {r.rss_after_mib:.1f} |",
        f"| fds: idle before / under load min-max / after close (pooled upstream) | {r.fds_baseline} / {min(loaded)}-{max(loaded)} / {r.fds_after} ({r.pooled_after}) |",
        f"| requests sent / recorded | {sent} / {r.rows} |",
        f"| client aborts / upstream truncations (truncate_after + close_after) | {r.sent['abort']} / {cut} ({r.sent['truncate']} + {r.sent['close']}) |",
        f"| aborts closed after ollamon had sent the whole stream (expected as successes) | {len(r.late_aborts)} |",
        f"| rows not as docs/metrics.md defines | {sum(r.mismatches.values())} |",
        f"| unexpected client errors | {sum(r.client_errors.values())} |",
    ]
    problems = flatness_problems(
        r.samples, warm, r.fds_baseline, r.fds_after, r.pooled_after, opts.streams + 1, rss_tol, fds_tol
    )
    lines.append(f"| flatness check | {'; '.join(problems) or 'flat'} |")
    lines += ["", f"sockets after close: {r.fds_detail or 'none'}"]
    if r.mismatches:
        lines += ["", f"mismatches: {dict(r.mismatches)}", *r.examples]
    if r.client_errors:
        lines += ["", f"client errors: {dict(r.client_errors)}"]
    return "\n".join(lines)
