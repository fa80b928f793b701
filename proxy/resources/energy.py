"""Energy per request: GPU power integrated over a request's lifetime, shared among concurrent requests.

The meter keeps one running integral, ``F(t) = ∫ P(s) / n(s) ds`` over the times when at least one
inference request is in flight, where ``P`` is the total GPU power (a step function: each reading holds
until the next one) and ``n`` the number of inference requests in flight. A request alive on
``[arrival, end]`` gets ``F(end) - F(arrival)``: at every instant the power is split equally among the
requests alive then, so the shares of overlapping requests always add up to the energy drawn while any
request ran (``attributed_j``). This is processor sharing's "virtual time"; it costs a few float
operations per event, keeps no per-request history, and needs no lock: ``begin``/``end`` (request path)
and ``update`` (sampler) all run on the event loop. docs/metrics.md states the definition for users.

``gpu_memory_peak_mb`` is the largest total GPU memory reading in effect during the request: the reading
current at arrival and every reading taken before its end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from itertools import islice

__all__ = ["EnergyMeter", "EnergySpan"]


class EnergySpan:
    """One request's marks on the meter; ``energy_j`` and ``memory_peak_mb`` are final after ``end``."""

    __slots__ = ("energy_j", "epoch0", "f0", "known0", "memory_peak_mb", "seq0")

    def __init__(self, f0: float, known0: bool, epoch0: int, seq0: int) -> None:
        self.f0 = f0
        self.known0 = known0
        self.epoch0 = epoch0
        self.seq0 = seq0
        self.energy_j: float | None = None
        self.memory_peak_mb: float | None = None


class EnergyMeter:
    """Attributes GPU energy to requests; all methods are called from the event loop thread."""

    def __init__(
        self, *, clock: Callable[[], float] = time.perf_counter, memory_readings: int = 4096
    ) -> None:
        self._clock = clock
        self._t = clock()
        self._power_w: float | None = None
        self._f = 0.0  # F(t): joules per in-flight request so far
        self._epoch = 0  # number of power readings taken
        self._seq = -1  # index of the newest memory reading
        self._memory: deque[float | None] = deque(maxlen=memory_readings)
        self.in_flight = 0
        self.total_j = 0.0  # ∫ P dt while power was known, idle time included
        self.attributed_j = 0.0  # ∫ P dt while at least one request was in flight

    def _advance(self, now: float) -> None:
        dt = now - self._t
        if dt <= 0:
            return
        self._t = now
        if self._power_w is None:
            return
        joules = self._power_w * dt
        self.total_j += joules
        if self.in_flight > 0:
            self._f += joules / self.in_flight
            self.attributed_j += joules

    def update(self, power_w: float | None, memory_used_mb: float | None) -> None:
        """A new GPU reading (totals over all GPUs); None when no GPU is visible or the reading failed."""
        self._advance(self._clock())
        self._power_w = power_w
        if power_w is not None:
            self._epoch += 1
        self._seq += 1
        self._memory.append(memory_used_mb)

    def begin(self) -> EnergySpan:
        """An inference request starts: count it and return its marks."""
        self._advance(self._clock())
        self.in_flight += 1
        return EnergySpan(self._f, self._power_w is not None, self._epoch, self._seq)

    def end(self, span: EnergySpan) -> None:
        """The request ended: fill ``span`` (None where no GPU reading covered any of it)."""
        self._advance(self._clock())
        self.in_flight -= 1
        if span.known0 or self._epoch > span.epoch0:
            span.energy_j = self._f - span.f0
        if self._seq >= 0:
            first = self._seq - len(self._memory) + 1
            seen = [m for m in islice(self._memory, max(0, span.seq0 - first), None) if m is not None]
            span.memory_peak_mb = max(seen) if seen else None
