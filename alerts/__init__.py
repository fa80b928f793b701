"""Alerts: rules from config.yaml, evaluated from in-memory windows, with a state machine per alert,
cooldowns, and webhook/Slack/log notifications. docs/alerts.md is the user's guide.

Module map (the data flow): rules.py parses and validates; windows.py keeps the rolling windows fed by
the writer and the sampler; state.py is one alert's state machine; engine.py evaluates; notify.py
delivers; store.py persists. The app wiring, HTTP routes and CLI live in proxy/ (proxy/api/alerts.py,
proxy/cli/alerts.py): this package knows nothing of them.
"""

from __future__ import annotations

from alerts.engine import AlertEngine
from alerts.errors import AlertsError, AlertStoreError, RuleError
from alerts.rules import AlertsSpec, parse_alerts

__all__ = [
    "AlertEngine",
    "AlertStoreError",
    "AlertsError",
    "AlertsSpec",
    "RuleError",
    "parse_alerts",
]
