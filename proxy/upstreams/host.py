"""One host's live state: what the health checks saw, the passive circuit, requests outstanding.

Two independent verdicts decide whether a host takes new requests:

* **active** (health.py, in the background): ``up`` is False after a failed ``GET /api/version`` and True
  again after a good one; None until the first check (treated as up, so a fresh pool routes at once).
* **passive** (every request's outcome): ``eject_after`` consecutive failures (connect errors, timeouts
  before a response, 5xx) eject the host for ``eject_cooldown_s``. After the cooldown it is half-open: one
  trial request at a time; a success closes the circuit, a failure ejects it again.

Everything here is plain attribute arithmetic: the request path calls it, so it never does I/O.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from proxy.upstream_url import Upstream
from proxy.upstreams.settings import HostSpec

__all__ = ["Host", "Outcome"]

logger = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a request ended, as far as the host's health is concerned."""

    OK = "ok"  # the host answered (any status below 500; a stream that ran to its end)
    FAILURE = "failure"  # connect error, timeout or reset before a response, a 5xx, a stream cut by the host
    NEUTRAL = "neutral"  # not the host's doing (the client went away, ollamon shut down)


class Host:
    """Mutable state of one configured host; created and owned by the pool."""

    __slots__ = (
        "ejected_until",
        "ejections",
        "failures",
        "index",
        "installed",
        "last_check_at",
        "last_error",
        "last_tags_at",
        "loaded",
        "outstanding",
        "request_failures",
        "requests",
        "spec",
        "swrr",
        "trial",
        "up",
        "version",
    )

    def __init__(self, spec: HostSpec, index: int) -> None:
        self.spec = spec
        self.index = index  # position in the config: the deterministic order of every listing
        self.outstanding = 0
        self.swrr = 0.0  # smooth weighted round-robin credit, for ties (routing.py)
        self.up: bool | None = None
        self.version: str | None = None
        self.last_check_at: float | None = None
        self.last_tags_at: float | None = None
        self.last_error: str | None = None
        self.loaded: frozenset[str] = frozenset()
        self.installed: frozenset[str] = frozenset()
        self.failures = 0  # consecutive failed requests
        self.ejected_until = 0.0  # monotonic time; 0: the circuit is closed
        self.ejections = 0
        self.trial = False  # half-open: a trial request is out
        self.requests = 0
        self.request_failures = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def upstream(self) -> Upstream:
        """Where requests to this host go (``url_for``, ``host_header``)."""
        return self.spec.upstream

    def available(self, now: float) -> bool:
        """May this host take a new request now (active check not failed, circuit closed or half-open free)?"""
        if self.up is False:
            return False
        if not self.ejected_until:
            return True
        return now >= self.ejected_until and not self.trial

    def begin(self, now: float) -> None:
        self.outstanding += 1
        self.requests += 1
        if self.ejected_until and now >= self.ejected_until:
            self.trial = True

    def end(self, outcome: Outcome, now: float, eject_after: int, cooldown_s: float) -> None:
        self.outstanding = max(0, self.outstanding - 1)
        if outcome is Outcome.NEUTRAL:
            self.trial = False
            return
        if outcome is Outcome.OK:
            if self.ejected_until:
                logger.info("upstream %s is back: a trial request succeeded", self.name)
            self.failures, self.ejected_until, self.trial = 0, 0.0, False
            return
        self.request_failures += 1
        self.failures += 1
        half_open = bool(self.ejected_until) and now >= self.ejected_until
        if half_open or (not self.ejected_until and self.failures >= eject_after):
            self.ejected_until = now + cooldown_s
            self.ejections += 1
            logger.warning(
                "upstream %s ejected for %g s after %d consecutive failed requests",
                self.name,
                cooldown_s,
                self.failures,
            )
        self.trial = False

    def state(self, now: float) -> str:
        """``up``, ``down`` (active check failed), ``ejected`` or ``half_open`` (passive), ``unknown``."""
        if self.up is False:
            return "down"
        if self.ejected_until:
            return "ejected" if now < self.ejected_until else "half_open"
        return "unknown" if self.up is None else "up"

    def snapshot(self, now: float) -> dict[str, Any]:
        """What /ollamon/health can show for this host."""
        return {
            "name": self.name,
            "url": str(self.spec.upstream),
            "state": self.state(now),
            "weight": self.spec.weight,
            "models": list(self.spec.models),
            "outstanding": self.outstanding,
            "requests": self.requests,
            "request_failures": self.request_failures,
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3) if self.ejected_until else 0.0,
            "version": self.version,
            "loaded": sorted(self.loaded),
            "installed": len(self.installed),
            "last_error": self.last_error,
        }
