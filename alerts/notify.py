"""Notification channels: ``webhook`` (JSON, optionally HMAC-signed), ``slack`` (incoming webhook), ``log``.

Why every delivery is its own background task: a receiver that is down, slow or failing must never hold
up rule evaluation or the proxy. ``Notifier.send()`` returns at once; each HTTP delivery then runs with a
timeout and retries with exponential back-off and jitter up to ``max_attempts``. Each failed attempt is
reported through ``on_result`` (the engine records it on the alert) and logged. A delivery keeps its
body and ``X-Ollamon-Delivery`` id across retries, so a receiver can de-duplicate.

docs/alerts.md documents the webhook body (schema version 1) and the signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from alerts.rules import ChannelSpec, Rule
from alerts.state import Alert
from storage.records import iso_utc
from storage.tasks import spawn
from storage.version import VERSION

__all__ = ["SIGNATURE_HEADER", "Notification", "Notifier", "build_payload", "sign"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SIGNATURE_HEADER = "X-Ollamon-Signature"
_COLORS = {"info": "#439FE0", "warning": "warning", "error": "danger", "critical": "danger"}
_RETRY_STATUSES = frozenset({408, 425, 429})

# on_result(alert_id, channel, error or None, final): called after every attempt that failed and after
# the final outcome of each delivery.
ResultCallback = Callable[[int | None, str, str | None, bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Notification:
    alert_id: int | None
    event: str  # firing | repeat | resolved
    payload: dict[str, Any]


def _iso(t: float | None) -> str | None:
    return None if t is None else iso_utc(t)


def build_payload(alert: Alert, rule: Rule, event: str, now: float) -> dict[str, Any]:
    """The webhook body (schema version 1; docs/alerts.md)."""
    return {
        "version": SCHEMA_VERSION,
        "source": "ollamon",
        "event": event,
        "sent_at": _iso(now),
        "alert": {
            "id": alert.id,
            "rule": alert.rule,
            "state": alert.state,
            "severity": alert.severity,
            "labels": dict(alert.labels),
            "value": alert.value,
            "threshold": alert.threshold,
            "values": dict(alert.values),
            "message": alert.message,
            "started_at": _iso(alert.started_at),
            "fired_at": _iso(alert.fired_at),
            "resolved_at": _iso(alert.resolved_at),
            "notification_count": alert.notification_count,
        },
        "rule": {
            "name": rule.name,
            "expr": rule.describe(),
            "for_s": rule.for_s,
            "cooldown_s": rule.cooldown_s,
        },
    }


def sign(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _summary(payload: Mapping[str, Any]) -> str:
    a = payload["alert"]
    labels = ", ".join(f"{k}={v}" for k, v in sorted(a["labels"].items()))
    tag = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}.get(payload["event"], "")
    return f"[{tag}] {a['rule']} ({a['severity']}{'; ' + labels if labels else ''}): {a['message']}"


def _render(spec: ChannelSpec, n: Notification, delivery_id: str) -> tuple[bytes, dict[str, str]]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"ollamon/{VERSION}",
    }
    if spec.type == "slack":
        a = n.payload["alert"]
        color = "good" if n.event == "resolved" else _COLORS.get(a["severity"], "warning")
        body = orjson.dumps(
            {
                "text": _summary(n.payload),
                "attachments": [
                    {
                        "color": color,
                        "fields": [
                            {"title": "value", "value": f"{a['value']}", "short": True},
                            {"title": "threshold", "value": f"{a['threshold']}", "short": True},
                        ],
                    }
                ],
            }
        )
    else:
        body = orjson.dumps(n.payload)
        headers["X-Ollamon-Event"] = n.event
        headers["X-Ollamon-Delivery"] = delivery_id
        if spec.secret:
            headers[SIGNATURE_HEADER] = sign(spec.secret, body)
    headers.update(spec.headers)
    return body, headers


class Notifier:
    """Sends notifications to the configured channels without ever making the caller wait."""

    def __init__(
        self,
        channels: Mapping[str, ChannelSpec],
        on_result: ResultCallback | None = None,
        *,
        max_in_flight: int = 256,
        rng: random.Random | None = None,
    ) -> None:
        self.channels = dict(channels)
        self.on_result = on_result
        self.max_in_flight = max_in_flight
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.retries = 0
        self.dropped = 0

    async def start(self) -> None:
        if self._session is None and any(c.type != "log" for c in self.channels.values()):
            # A session of its own: a stuck receiver can never take connections from the proxy's pool.
            self._session = aiohttp.ClientSession(trust_env=False)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Give deliveries in flight ``grace_s`` to finish, cancel the rest, close the session."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                logger.warning("shutting down: %d alert notification(s) not delivered", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send(self, n: Notification, channels: Sequence[str]) -> None:
        """Deliver ``n`` to each of ``channels`` in the background; returns at once."""
        for name in channels:
            spec = self.channels[name]
            self.sent += 1
            if spec.type == "log":
                level = getattr(logging, spec.level.upper())
                if n.event == "resolved":
                    level = logging.INFO
                logger.log(level, "alert %s", _summary(n.payload))
                self.delivered += 1
                continue
            if len(self._tasks) >= self.max_in_flight or self._session is None:
                self.dropped += 1
                logger.error(
                    "alert notification to %s dropped: %d deliveries in flight", name, len(self._tasks)
                )
                continue
            task = spawn(self._deliver(spec, n), name=f"alert-notify-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "retries": self.retries,
            "dropped": self.dropped,
            "in_flight": self.in_flight,
        }

    async def _report(self, n: Notification, channel: str, error: str | None, final: bool) -> None:
        if self.on_result is None:
            return
        try:
            await self.on_result(n.alert_id, channel, error, final)
        except Exception:
            logger.exception("recording the delivery result of alert %s failed", n.alert_id)

    async def _deliver(self, spec: ChannelSpec, n: Notification) -> None:
        assert self._session is not None
        body, headers = _render(spec, n, uuid.uuid4().hex)
        timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        for attempt in range(1, spec.max_attempts + 1):
            retryable = True
            try:
                async with self._session.post(spec.url, data=body, headers=headers, timeout=timeout) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.delivered += 1
                        await self._report(n, spec.name, None, True)
                        return
                    error = f"HTTP {resp.status}"
                    retryable = resp.status >= 500 or resp.status in _RETRY_STATUSES
            except TimeoutError:
                error = f"no answer within {spec.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if not retryable or attempt == spec.max_attempts:
                self.failed += 1
                message = f"{spec.name}: gave up after {attempt} attempt(s): {error}"
                logger.error("alert %s (%s) not delivered: %s", n.alert_id, n.event, message)
                await self._report(n, spec.name, message, True)
                return
            self.retries += 1
            message = f"{spec.name}: attempt {attempt}/{spec.max_attempts} failed: {error}"
            logger.warning("alert %s (%s): %s; retrying", n.alert_id, n.event, message)
            await self._report(n, spec.name, message, False)
            # Exponential back-off with "equal jitter": half fixed, half random, so retries from many
            # alerts spread out yet each wait is at least as long as the previous one.
            delay = min(spec.backoff_max_s, spec.backoff_initial_s * 2 ** (attempt - 1))
            await asyncio.sleep(self._rng.uniform(delay / 2, delay))
