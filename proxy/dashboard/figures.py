"""The dashboard's request figures, kept in memory from the records the writer stores (never SQLite per tick).

``LiveFigures`` is a writer listener (``writer.add_listener``): ``offer(records)`` runs on the event loop
with every committed batch, returns at once and never raises. It keeps:

- ``rate``: requests and completion tokens of the records stored in the last ``RATE_WINDOW_S`` (10) seconds,
  in one-second buckets of the moment each record reached the listener (the request had finished);
- ``windows``: a five-minute rolling window of the same kind as the alert engine's (alerts/windows.py), for
  every model together only (the tiles never read one model), so
  ``error_rate``, ``ttft_ms_p95`` and ``response_time_ms_p95`` mean what they mean in the summary API and in
  alert rules (successful requests only for latencies; ollamon's one quantile method, storage/histogram.py);
- ``minutes``: the figures of the last few UTC minutes by **arrival** ``timestamp``, as
  ``/ollamon/api/timeseries?bucket=1m`` buckets them, so the page can update the newest bucket of its charts
  live and the point matches the stored one once the chart reloads;
- ``recent``: the newest requests as compact rows, each with a sequence number, for the live table.

Rows with ``done_reason`` ``load`` or ``unload`` are model load calls, not inferences, and are left out of
every figure (as everywhere in ollamon); they still appear in the recent rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import operator
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from alerts.metrics import FIELDS, METRICS
from alerts.windows import Fold, RequestWindows, _Contribution, _Series, column_figure, contribution
from storage.histogram import bucket_index, hist_quantile
from storage.records import InferenceRecord

__all__ = ["FIGURE_WINDOW_S", "RATE_WINDOW_S", "LiveFigures", "MinuteBucket", "compact_row"]

logger = logging.getLogger(__name__)

RATE_WINDOW_S = 10
FIGURE_WINDOW_S = 300
MINUTES_KEPT = 3
RECENT_KEPT = 200
_MAX_TEXT = 300  # error messages in live rows are cut; the drill-down shows the stored one whole
_ROW_FIELDS = (
    "timestamp",
    "request_id",
    "model_name",
    "endpoint",
    "status_code",
    "success",
    "cancelled",
    "stream",
    "response_time_ms",
    "ttft_ms",
    "queue_time_ms",
    "prompt_tokens",
    "completion_tokens",
    "tokens_per_second",
    "done_reason",
    "user_id",
    "error_message",
)
_MINUTE_COLUMNS = ("ttft_ms", "response_time_ms", "queue_time_ms")
_MINUTE_BY_FIELD = {FIELDS.index(col): col for col in _MINUTE_COLUMNS}  # contribution's index -> column
_MINUTE_QUANTILES = (("ttft_ms", (50, 95)), ("response_time_ms", (50, 95)), ("queue_time_ms", (95,)))


_row_values = operator.attrgetter(*_ROW_FIELDS)  # one C call instead of 17 getattr: offer runs per record


def compact_row(rec: InferenceRecord) -> dict[str, Any]:
    """The fields of ``rec`` the live table shows (the names of ``/ollamon/api/requests`` rows)."""
    row = dict(zip(_ROW_FIELDS, _row_values(rec), strict=True))
    msg = row["error_message"]
    if isinstance(msg, str) and len(msg) > _MAX_TEXT:
        row["error_message"] = msg[:_MAX_TEXT] + "…"
    return row


def _epoch(timestamp: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def _minute_of(timestamp: str) -> int | None:
    """The start (Unix seconds) of the UTC minute of an ISO timestamp; None when it does not parse."""
    arrived = _epoch(timestamp)
    return None if arrived is None else int(arrived // 60 * 60)


class MinuteBucket:
    """One UTC minute of requests by arrival: counts, completion tokens, and histograms of the latencies of
    its successful requests.

    Its quantiles are kept until a record is added (``_quantiles``): a minute that has passed rarely changes,
    and sorting a histogram of a minute at 100 requests/s (hundreds of 1 % bins) is the costly part of a
    frame (docs/benchmarks.md, *Dashboard snapshot cost*).
    """

    __slots__ = (
        "_quantiles",
        "cancelled",
        "completion_tokens",
        "failed",
        "hists",
        "requests",
        "start",
        "successful",
    )

    def __init__(self, start: int) -> None:
        self.start = start
        self.requests = self.successful = self.failed = self.cancelled = self.completion_tokens = 0
        self.hists: dict[str, dict[int, int]] = {c: {} for c in _MINUTE_COLUMNS}
        self._quantiles: dict[str, float | None] | None = None

    def add(self, rec: InferenceRecord, c: _Contribution | None = None) -> None:
        """Count ``rec``; ``c``, its window ``contribution``, already holds the histogram buckets."""
        self._quantiles = None
        self.requests += 1
        self.completion_tokens += rec.completion_tokens or 0
        if rec.success:
            self.successful += 1
            if c is not None:
                for i, _, b in c[2]:
                    col = _MINUTE_BY_FIELD.get(i)
                    if col is not None:
                        h = self.hists[col]
                        h[b] = h.get(b, 0) + 1
                return
            for col in _MINUTE_COLUMNS:
                v = getattr(rec, col)
                if v is not None:
                    h = self.hists[col]
                    b = bucket_index(float(v))
                    h[b] = h.get(b, 0) + 1
        elif rec.cancelled:
            self.cancelled += 1
        else:
            self.failed += 1

    def figures(self, now: float) -> dict[str, Any]:
        """The bucket as a ``/ollamon/api/timeseries`` row: rates divide by the part of the minute elapsed."""
        seconds = max(1e-9, min(60.0, now - self.start))
        out: dict[str, Any] = {
            "bucket_start_s": self.start,
            "requests": self.requests,
            "successful": self.successful,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "requests_per_s": self.requests / seconds,
            "tokens_per_s": self.completion_tokens / seconds,
        }
        if self._quantiles is None:
            self._quantiles = self._compute_quantiles()
        out.update(self._quantiles)
        return out

    def _compute_quantiles(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for col, qs in _MINUTE_QUANTILES:
            for q in qs:
                out[f"{col}_p{q}"] = hist_quantile(self.hists[col], q / 100)
        return out


class _AllModelsWindows(RequestWindows):
    """``RequestWindows`` for every model together only: the tiles never ask per model, and the per-model
    series doubled the cost of each record. Same buckets, same totals."""

    def add_fold(self, f: Fold, at: float) -> None:
        """Count a batch's folded contributions at ``at`` (one step per batch, not per record)."""
        self.records += f.n
        series = self._series.get(None)
        if series is None:
            series = self._series[None] = _Series(self.windows)
        series.add_fold(int(at), f)


class LiveFigures:
    """The in-memory figures behind the tiles, the live chart points and the live table (a writer listener)."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.windows = _AllModelsWindows([FIGURE_WINDOW_S])
        self._rate: deque[list[int]] = deque()  # [second, requests, completion tokens]
        self.minutes: dict[int, MinuteBucket] = {}
        self.recent: deque[tuple[int, dict[str, Any]]] = deque(maxlen=RECENT_KEPT)
        self.seq = 0  # sequence number of the newest recent row
        self.records = 0
        self._pruned_at = 0
        self._minute_starts: dict[str, int] = {}  # "YYYY-MM-DDTHH:MM" of a UTC ("...Z") timestamp -> start

    # -- the writer listener -----------------------------------------------------------------------

    def offer(self, records: Sequence[Any]) -> None:
        """Count every inference record of a stored batch (on the loop; never raises)."""
        try:
            now = self.clock()
            if int(now) != self._pruned_at:
                self._prune(now)  # also while no page is open, so memory stays bounded
            self._add_batch(records, now)
        except Exception:  # a bad record must not break the writer's batch hand-off
            logger.exception("dashboard figures: a record could not be counted")

    def _add_batch(self, records: Sequence[Any], now: float) -> None:
        """Per record only what is per record (its row, its minute); the window and the rate take the batch
        once (``Fold``): offer runs on the event loop, beside the proxied streams."""
        fold = Fold()
        tokens = 0
        oldest = now - 60 * MINUTES_KEPT
        inference = [rec for rec in records if isinstance(rec, InferenceRecord)]
        # Only the batch's last RECENT_KEPT rows can stay in ``recent``: the others are numbered, not built.
        first_kept = self.seq + len(inference) - RECENT_KEPT
        for rec in inference:
            self.seq += 1
            if self.seq > first_kept:
                self.recent.append((self.seq, compact_row(rec)))
            c = contribution(rec)
            if c is None:  # a load or unload call
                continue
            fold.add(c)
            tokens += rec.completion_tokens or 0
            start = self._minute_start(rec.timestamp)
            if start is not None and start > oldest:
                m = self.minutes.get(start)
                if m is None:
                    m = self.minutes[start] = MinuteBucket(start)
                m.add(rec, c)
        if not fold.n:
            return
        self.records += fold.n
        self.windows.add_fold(fold, now)
        sec = int(now)
        if not self._rate or self._rate[-1][0] < sec:
            self._rate.append([sec, 0, 0])
        bucket = self._rate[-1]
        bucket[1] += fold.n
        bucket[2] += tokens

    def _minute_start(self, timestamp: str) -> int | None:
        """``_minute_of`` with the minute of a UTC timestamp remembered by its first 16 characters: a batch's
        records share a few minutes, and parsing each timestamp was a fifth of this listener's time."""
        if (
            not isinstance(timestamp, str)
            or len(timestamp) < 18
            or timestamp[16] != ":"
            or timestamp[-1] != "Z"
        ):
            return _minute_of(timestamp)
        prefix = timestamp[:16]
        start = self._minute_starts.get(prefix)
        if start is None:
            start = _minute_of(timestamp)
            if start is None:
                return None
            if len(self._minute_starts) >= 16:
                self._minute_starts.clear()
            self._minute_starts[prefix] = start
        return start

    # -- read once per tick --------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Let go of what has left every window."""
        sec = self._pruned_at = int(now)
        while self._rate and self._rate[0][0] <= sec - RATE_WINDOW_S:
            self._rate.popleft()
        for start in [s for s in self.minutes if s <= now - 60 * MINUTES_KEPT]:
            del self.minutes[start]
        self.windows.advance(now)

    def tiles(self, now: float) -> dict[str, Any]:
        """The headline figures (docs/dashboard.md defines each)."""
        self._prune(now)
        reqs = sum(b[1] for b in self._rate)
        toks = sum(b[2] for b in self._rate)
        t = self.windows.totals(FIGURE_WINDOW_S)
        return {
            "rate_window_s": RATE_WINDOW_S,
            "requests_per_s": reqs / RATE_WINDOW_S,
            "tokens_per_s": toks / RATE_WINDOW_S,
            "window_s": FIGURE_WINDOW_S,
            "requests": t.n,
            "failed": t.failed,
            "cancelled": t.cancelled,
            "error_rate": t.failed / t.n if t.n else None,
            "ttft_ms_p95": column_figure(t, METRICS["ttft_ms_p95"]),
            "response_time_ms_p95": column_figure(t, METRICS["response_time_ms_p95"]),
        }

    def minute_points(self, now: float) -> list[dict[str, Any]]:
        """The figures of the minutes still kept, oldest first (the newest is the current minute)."""
        return [self.minutes[s].figures(now) for s in sorted(self.minutes)]

    def rows_after(self, seq: int) -> list[dict[str, Any]]:
        """Recent rows with a sequence number above ``seq``, newest first."""
        return [row for n, row in reversed(self.recent) if n > seq]
