"""The alert engine: every ``interval_s`` it evaluates every rule against the in-memory windows, steps each
alert's state machine, records transitions and hands notifications to the notifier.

Data comes in without the engine asking: ``offer(records)`` is the writer's listener hook (called after
each committed batch), ``observe_system(values)`` takes sampler readings. Evaluation never reads the
database; only a transition or a notification writes to it (alerts/store.py), and a notification is sent
in the background (alerts/notify.py), so a slow receiver cannot slow evaluation down.

Cooldown: a (rule, label set) is announced firing at most once per ``cooldown``. A new firing inside the
cooldown of the previous announcement is recorded but announced only once the cooldown has passed (if it
is still firing); a firing alert is re-announced (``repeat``) every ``cooldown``. A resolution is sent
only for an alert whose firing was announced.

A fleet (several instances on one database) evaluates once: only the holder of the alert lease
(storage/lease.py) evaluates and announces; the others drop what they are offered. A new holder first
reloads the windows, the open alerts and the last announcements from the shared store, so an alert
announced by the previous holder is not announced again, and while it holds the lease it reads the other
instances' requests from the store every interval (alerts/fleet.py). Alone (SQLite), the lease is
``AlwaysHeld``: none of this costs anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import string
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from alerts.errors import AlertStoreError
from alerts.fleet import FleetFeed
from alerts.metrics import METRICS, SYSTEM_METRICS, MetricKind
from alerts.notify import Notification, Notifier, build_payload
from alerts.rules import AlertsSpec, Condition, Rule
from alerts.state import Alert, Transition, step
from alerts.store import AlertStore
from alerts.windows import GaugeWindows, RequestWindows, Totals, column_figure
from storage.lease import AlwaysHeld, Lease
from storage.model_names import model_matches
from storage.records import Record
from storage.tasks import spawn

__all__ = ["AlertEngine"]

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]  # True when the upstream is reachable


def _fingerprint(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def request_value(c: Condition, t: Totals) -> float | None:
    """The value of request metric ``c.metric`` over ``t``; None when there is not enough data."""
    if c.metric == "requests_per_s":
        return t.n / c.window_s
    if t.n == 0 or t.n < c.min_requests:
        return None
    spec = METRICS[c.metric]
    if spec.field >= 0:
        return column_figure(t, spec)
    if c.metric == "error_rate":
        return t.failed / t.n
    if c.metric == "cancel_rate":
        return t.cancelled / t.n
    raise AssertionError(f"not a request metric: {c.metric}")


class AlertEngine:
    """Owns the windows, the alerts in memory and the evaluation task; ``start()``/``stop()`` once."""

    def __init__(
        self,
        spec: AlertsSpec,
        *,
        interval_s: float = 5.0,
        resolve_delay_s: float = 0.0,
        store: AlertStore | None = None,
        probe: Probe | None = None,
        dropped: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        lease: Lease | None = None,
    ) -> None:
        self.spec = spec
        self.lease: Lease = lease if lease is not None else AlwaysHeld("alerts")
        self.interval_s = interval_s
        self.resolve_delay_s = resolve_delay_s
        self.store = store
        self.probe = probe
        self.dropped = dropped
        self.clock = clock
        self.rules = {r.name: r for r in spec.rules}
        self.requests = RequestWindows(spec.windows(MetricKind.REQUESTS))
        other = (
            spec.windows(MetricKind.GAUGE) | spec.windows(MetricKind.PROBE) | spec.windows(MetricKind.COUNTER)
        )
        self.gauges = GaugeWindows(max(other, default=0) + 2)
        self._uses = {c.metric for r in spec.rules for c in r.conditions}
        self.notifier = Notifier(spec.channels, self._delivery_result)
        self.alerts: dict[tuple[str, str], Alert] = {}
        self._announced: dict[tuple[str, str], float] = {}
        self.last_values: dict[str, dict[str, Any]] = {}
        self.started_at = clock()
        self.evaluations = 0
        self.last_evaluation_ms: float | None = None
        self.store_errors = 0
        self._task: asyncio.Task[None] | None = None
        self._tenure = 0  # the lease epoch our windows and alerts were restored for (0: none)
        horizon = float(max(self.requests.windows, default=0))
        self.fleet = (
            FleetFeed(store, horizon_s=horizon)
            if store is not None and self.lease.shared and horizon
            else None
        )

    # -- inputs ----------------------------------------------------------------------------------

    def offer(self, records: Sequence[Record]) -> None:
        """Writer listener: count a committed batch of records in the windows (never blocks, never raises).
        In a fleet, only while holding the alert lease (a new holder reloads from the store)."""
        if self.fleet is None:
            self.requests.add_batch(records, self.clock())
        elif self._tenure and self._tenure == self.lease.epoch and self.lease.held:
            now = self.clock()
            self.requests.add_batch(self.fleet.fresh(records, now), now)

    def observe_system(self, values: Mapping[str, float], at: float | None = None) -> None:
        """Sampler listener: one reading of the resource metrics (gpu_temperature_c, cpu_percent, ...)."""
        self.gauges.observe(values, self.clock() if at is None else at, SYSTEM_METRICS)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Try the lease; when held, reload open alerts and refill the windows from the database; then start
        evaluating (or standing by for the lease)."""
        self.started_at = now = self.clock()
        await self.notifier.start()
        await self.lease.start()
        if self.lease.held:
            await self._take_over(now)
        if self._task is None:
            self._task = spawn(self._run(), name="alert-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.lease.stop()  # released first: another instance takes over while we drain
        await self.notifier.stop()

    async def _take_over(self, now: float) -> None:
        """A new tenure of the lease: start afresh from the store (a previous holder may have moved on)."""
        epoch = self.lease.epoch
        if self._tenure or self.evaluations:
            self.requests = RequestWindows(self.requests.windows)
            self.alerts.clear()
            self._announced = {}
            self.last_values.clear()
        self.started_at = now  # as after a restart: unknown values hold the state for a window
        self._tenure = 0
        if self.fleet is not None:
            self.fleet.reset(now)
        if self.store is not None:
            await self._restore(now)
        self._tenure = epoch

    async def _restore(self, now: float) -> None:
        assert self.store is not None
        for a in await self.store.load_open():
            if a.rule not in self.rules:
                a.state, a.resolved_at = "resolved", now
                a.message = f"{a.message} (rule removed from the configuration)"
                await self._save(a, [("firing", "resolved")], now)
                continue
            self.alerts[(a.rule, a.fingerprint)] = a
        self._announced = await self.store.last_announced()
        horizon = max(self.requests.windows, default=0)
        if horizon:
            recent = await self.store.recent_requests(now - horizon)
            for at, rec in recent:
                if self.fleet is None or self.fleet.remember(rec.request_id, at):
                    self.requests.add(rec, at)
            logger.info(
                "alerts: %d open alert(s) reloaded, %d recent request(s)", len(self.alerts), len(recent)
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        # Standing by, the lease is looked at this often: a new holder evaluates as soon as it holds it.
        standby_s = min(self.interval_s, 0.1)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()) if self._tenure else standby_s)
            try:
                if not self.lease.held:
                    if self._tenure:
                        logger.info("alerts: the alert lease is gone; standing by")
                        self._tenure = 0
                    continue
                if self._tenure != self.lease.epoch:
                    await self._take_over(self.clock())
                    next_at = loop.time()
                if self.fleet is not None:
                    await self._read_fleet()
                await self.evaluate()
            except Exception:
                logger.exception("alert evaluation failed; trying again next interval")
                if not self._tenure:  # the take-over failed: not again at once
                    await asyncio.sleep(self.interval_s)
            next_at += self.interval_s
            if next_at < loop.time():  # fell behind (a stalled loop): skip, don't burst
                next_at = loop.time() + self.interval_s

    async def _read_fleet(self) -> None:
        """The other instances' requests since the last read; a failed read is covered by the next one."""
        assert self.fleet is not None
        try:
            for at, rec in await self.fleet.poll(self.clock()):
                self.requests.add(rec, at)
        except AlertStoreError as exc:
            self.store_errors += 1
            logger.warning(
                "alerts: cannot read the other instances' requests (next interval covers them): %s", exc
            )

    # -- evaluation ------------------------------------------------------------------------------

    async def evaluate(self, now: float | None = None) -> None:
        """One pass over every rule."""
        started = time.perf_counter()
        now = self.clock() if now is None else now
        self.requests.advance(now)
        self.gauges.clear_cache()
        if "upstream_down" in self._uses and self.probe is not None:
            try:
                reachable = await asyncio.wait_for(self.probe(), timeout=max(1.0, self.interval_s))
            except Exception as exc:
                logger.debug("upstream probe failed: %s", exc)
                reachable = False
            self.gauges.observe({"upstream_down": 0.0 if reachable else 1.0}, now, ("upstream_down",))
        if "records_dropped" in self._uses and self.dropped is not None:
            self.gauges.observe({"records_dropped": float(self.dropped())}, now, ("records_dropped",))
        for rule in self.spec.rules:
            await self._evaluate_rule(rule, now)
        self.evaluations += 1
        self.last_evaluation_ms = (time.perf_counter() - started) * 1000.0

    def _groups(self, rule: Rule) -> list[tuple[str, dict[str, str], str | None]]:
        """(fingerprint, group labels, model) for every label set the rule must look at now."""
        if not rule.group_by:
            return [("{}", {}, None)]
        models: set[str] = set()
        for c in rule.conditions:
            if c.kind is MetricKind.REQUESTS:
                models.update(self.requests.models(c.window_s, c.model))
        models.update(a.labels.get("model", "") for (r, _), a in self.alerts.items() if r == rule.name)
        return [(_fingerprint({"model": m}), {"model": m}, m) for m in sorted(models)]

    def _value(self, c: Condition, model: str | None, grouped: bool, now: float) -> float | None:
        if c.kind is MetricKind.REQUESTS:
            if grouped:
                if model is None or (c.model is not None and not model_matches(model, c.model)):
                    return None
                return request_value(c, self.requests.totals(c.window_s, model))
            return request_value(c, self.requests.totals(c.window_s, c.model))
        agg = "increase" if c.kind is MetricKind.COUNTER else c.agg
        return self.gauges.value(c.metric, c.window_s, agg, now)

    def _check(self, rule: Rule, model: str | None, now: float) -> tuple[bool | None, list[float | None]]:
        values = [self._value(c, model, bool(rule.group_by), now) for c in rule.conditions]
        results = [None if v is None else c.holds(v) for c, v in zip(rule.conditions, values, strict=True)]
        if rule.mode == "all":
            cond = False if False in results else (None if None in results else True)
        else:
            cond = True if True in results else (None if None in results else False)
        return cond, values

    async def _evaluate_rule(self, rule: Rule, now: float) -> None:
        last: dict[str, Any] = {"evaluated_at": now, "instances": {}}
        for fp, group, model in self._groups(rule):
            cond, values = self._check(rule, model, now)
            key = (rule.name, fp)
            a = self.alerts.get(key)
            if a is None:
                if not cond:
                    last["instances"][fp] = {"labels": group, "state": "inactive", "values": values}
                    continue
                a = Alert(
                    rule=rule.name, fingerprint=fp, labels={**rule.labels, **group}, severity=rule.severity
                )
            primary = self._primary(rule, values)
            if values[primary] is not None:
                a.value, a.threshold = values[primary], rule.conditions[primary].threshold
                a.values = {c.metric: v for c, v in zip(rule.conditions, values, strict=True)}
                a.message = self._message(rule, a, model, primary, values)
            resolve_delay = self.resolve_delay_s if rule.resolve_delay_s is None else rule.resolve_delay_s
            hold = now - self.started_at < rule.max_window_s
            transitions = step(a, cond, now, rule.for_s, resolve_delay, hold_unknown=hold)
            last["instances"][fp] = {"labels": group, "state": a.state, "values": values}
            if transitions:
                logger.info(
                    "alert %s %s: %s",
                    rule.name,
                    fp,
                    " -> ".join([transitions[0][0], *(t for _, t in transitions)]),
                )
            if a.state in ("inactive", "resolved"):
                self.alerts.pop(key, None)
            else:
                self.alerts[key] = a
            # A holder that lost the lease meanwhile (it hung) announces nothing: the next holder will.
            event = self._due_notification(rule, a, transitions, now) if self.lease.held else None
            if transitions or event:
                if event:
                    a.notification_count += 1
                    a.last_notified_at = now
                    if event != "resolved":
                        a.announced_at = self._announced[key] = now
                await self._save(a, transitions, now)
                if event:
                    payload = build_payload(a, rule, event, now)
                    self.notifier.send(Notification(a.id, event, payload), rule.notify)
        self.last_values[rule.name] = last

    def _due_notification(
        self, rule: Rule, a: Alert, transitions: list[Transition], now: float
    ) -> str | None:
        if a.state == "resolved":
            return "resolved" if transitions and a.announced_at is not None else None
        if a.state != "firing":
            return None
        if a.announced_at is None:
            previous = self._announced.get((rule.name, a.fingerprint))
            if previous is None or now - previous >= rule.cooldown_s:
                return "firing"
            return None
        if rule.repeat and rule.cooldown_s > 0 and now - a.announced_at >= rule.cooldown_s:
            return "repeat"
        return None

    @staticmethod
    def _primary(rule: Rule, values: list[float | None]) -> int:
        """Which condition's value and threshold an alert reports: the first that holds, else the first."""
        for i, (c, v) in enumerate(zip(rule.conditions, values, strict=True)):
            if v is not None and c.holds(v):
                return i
        return 0

    @staticmethod
    def _message(rule: Rule, a: Alert, model: str | None, primary: int, values: list[float | None]) -> str:
        c = rule.conditions[primary]
        if rule.description is None:
            pairs = zip(rule.conditions, values, strict=True)
            parts = [f"{cc.describe()} (now {v:.4g})" for cc, v in pairs if v is not None]
            where = f"model {model}: " if model else ""
            return where + ("; ".join(parts) if parts else rule.describe())
        fields = {
            "rule": rule.name,
            "severity": rule.severity,
            "value": a.value,
            "threshold": c.threshold,
            "metric": c.metric,
            "op": c.op,
            "window": c.window_text,
            "model": model or c.model or "*",
            "labels": a.labels,
            "values": a.values,
        }
        try:
            return string.Formatter().vformat(rule.description, (), fields)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
            return f"{rule.description} (template error: {exc})"

    # -- persistence and delivery results ------------------------------------------------------

    async def _save(self, a: Alert, transitions: list[Transition], now: float) -> None:
        if self.store is None:
            return
        try:
            await self.store.save(a, transitions, now)
        except Exception:
            self.store_errors += 1
            logger.exception("alert %s: recording %s failed", a.rule, transitions)

    async def _delivery_result(
        self, alert_id: int | None, channel: str, error: str | None, final: bool
    ) -> None:
        if error is not None:
            for a in self.alerts.values():
                if a.id == alert_id:
                    a.last_error = error
        if self.store is not None and alert_id is not None:
            await self.store.record_delivery(alert_id, error, self.clock())

    # -- introspection ---------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """For /ollamon/health."""
        states = [a.state for a in self.alerts.values()]
        return {
            "rules": len(self.rules),
            "firing": states.count("firing"),
            "pending": states.count("pending"),
            "evaluations": self.evaluations,
            "last_evaluation_ms": self.last_evaluation_ms,
            "store_errors": self.store_errors,
            "notifications": self.notifier.stats(),
            "lease": self.lease.snapshot(),
            **({"fleet": self.fleet.stats()} if self.fleet is not None else {}),
        }

    def rule_states(self) -> list[dict[str, Any]]:
        """Every rule with its current state (the worst of its label sets) and last values."""
        rank = {"inactive": 0, "pending": 1, "firing": 2}
        out = []
        for rule in self.spec.rules:
            last = self.last_values.get(rule.name, {})
            instances = []
            for fp, info in last.get("instances", {}).items():
                a = self.alerts.get((rule.name, fp))
                instances.append(
                    {
                        "labels": info["labels"],
                        "state": a.state if a is not None else "inactive",
                        "alert_id": a.id if a is not None else None,
                        "values": dict(zip([c.metric for c in rule.conditions], info["values"], strict=True)),
                        "since": a.fired_at or a.started_at if a is not None else None,
                    }
                )
            state = max((i["state"] for i in instances), key=lambda s: rank.get(s, 0), default="inactive")
            values = instances[0]["values"] if len(instances) == 1 else None
            out.append(
                {
                    "name": rule.name,
                    "severity": rule.severity,
                    "expr": rule.describe(),
                    "for_s": rule.for_s,
                    "cooldown_s": rule.cooldown_s,
                    "group_by": list(rule.group_by),
                    "notify": list(rule.notify),
                    "state": state,
                    "last_value": values,
                    "last_evaluated_at": last.get("evaluated_at"),
                    "instances": instances,
                }
            )
        return out
