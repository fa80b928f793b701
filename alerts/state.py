"""One alert's state machine: inactive -> pending -> firing -> resolved (pure, no I/O, no clock).

::

    inactive --cond--> pending --cond held for `for`--> firing --not cond for `resolve_delay`--> resolved
                         |  (for = 0 goes straight to firing)    ^ cond again: the delay restarts
                         +--not cond--> inactive (never fired)

An unknown condition (no data: too few requests, no sampler reading) counts as false, except for an alert
that is already pending or firing while the engine is still filling its windows after a start: then the
state is held, so a restart cannot resolve an alert just because memory is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OPEN_STATES", "STATES", "Alert", "Transition", "step"]

STATES = ("inactive", "pending", "firing", "resolved")
OPEN_STATES = ("pending", "firing")
Transition = tuple[str, str]


@dataclass(slots=True)
class Alert:
    """One rule firing (or about to) for one label set. Times are Unix seconds."""

    rule: str
    fingerprint: str  # the label set that tells this alert apart within its rule, as canonical JSON
    labels: dict[str, str]
    severity: str
    threshold: float | None = None
    state: str = "inactive"
    id: int | None = None
    value: float | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    message: str = ""
    started_at: float | None = None  # the condition first held (pending, or firing when for = 0)
    fired_at: float | None = None
    resolved_at: float | None = None
    false_since: float | None = None  # firing, condition false since (resolve delay)
    last_notified_at: float | None = None
    announced_at: float | None = None  # last firing/repeat notification sent for this alert
    notification_count: int = 0
    last_error: str | None = None
    restored: bool = False  # loaded from the database at startup

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


def step(
    alert: Alert, cond: bool | None, now: float, for_s: float, resolve_delay_s: float, hold_unknown: bool
) -> list[Transition]:
    """Advance ``alert`` by one evaluation; return the transitions taken (usually none)."""
    if cond is None:
        if hold_unknown and alert.open:
            return []
        cond = False
    taken: list[Transition] = []

    def go(to: str) -> None:
        taken.append((alert.state, to))
        alert.state = to

    if alert.state in ("inactive", "resolved"):
        if cond:
            alert.started_at = now
            alert.resolved_at = None
            if for_s <= 0:
                alert.fired_at = now
                go("firing")
            else:
                go("pending")
    elif alert.state == "pending":
        if not cond:
            alert.resolved_at = now
            go("inactive")
        elif alert.started_at is None or now - alert.started_at >= for_s:
            alert.fired_at = now
            go("firing")
    elif alert.state == "firing":
        if cond:
            alert.false_since = None
        else:
            if alert.false_since is None:
                alert.false_since = now
            if now - alert.false_since >= resolve_delay_s:
                alert.resolved_at = now
                go("resolved")
    return taken
