"""Recent content rates for the alert engine: ``unsafe_rate`` and ``pii_rate`` over the last five minutes.

The analyzer adds each ``ContentRecord`` as it writes it; the counts live in 10-second buckets, so memory is
bounded (30 buckets) whatever the request rate. The definitions are those of ``/ollamon/api/content``
(storage/content_reads.py): ``unsafe_rate`` = unsafe verdicts / analyses with a verdict, ``pii_rate`` =
analyses with at least one PII item in prompt or response / analyses where PII was checked. A rate with
no analysis behind it is None (no data), never 0.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from storage.content import ContentRecord

__all__ = ["RATES_WINDOW_S", "ContentRates"]

RATES_WINDOW_S = 300.0
_BUCKET_S = 10.0


class ContentRates:
    """Counts (judged, unsafe, PII checked, with PII) per 10 s bucket over the last ``RATES_WINDOW_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [bucket index, judged, unsafe, checked, with_pii]

    def add(self, record: ContentRecord) -> None:
        """Count one finished analysis (on the loop; O(1))."""
        index = int(self._clock() // _BUCKET_S)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0, 0, 0])
            self._trim(index)
        b = self._buckets[-1]
        if record.verdict is not None:
            b[1] += 1
            b[2] += record.verdict == "unsafe"
        if record.pii_count is not None:
            b[3] += 1
            b[4] += record.pii_count > 0

    def _trim(self, index: int) -> None:
        oldest = index - int(RATES_WINDOW_S // _BUCKET_S) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def rates(self) -> dict[str, float]:
        """``{"unsafe_rate": r, "pii_rate": r}`` over the last five minutes; a rate without data is absent."""
        self._trim(int(self._clock() // _BUCKET_S))
        judged = sum(b[1] for b in self._buckets)
        unsafe = sum(b[2] for b in self._buckets)
        checked = sum(b[3] for b in self._buckets)
        with_pii = sum(b[4] for b in self._buckets)
        out: dict[str, float] = {}
        if judged:
            out["unsafe_rate"] = unsafe / judged
        if checked:
            out["pii_rate"] = with_pii / checked
        return out
