"""Alerts: rules from config.yaml, evaluated from in-memory windows, with a state machine per alert,
cooldowns, and webhook/Slack/log notifications. docs/alerts.md is the user's guide.

Module map (the data flow): rules.py parses and validates; windows.py keeps the rolling windows fed by
the writer and the sampler; state.py is one alert's state machine; engine.py evaluates; notify.py
delivers; store.py persists; api.py and cli.py surface it; setup.py wires it into the app.
"""

from __future__ import annotations

from .engine import AlertEngine
from .errors import AlertsError, AlertStoreError, RuleError
from .keys import ENGINE_KEY
from .rules import AlertsSpec, parse_alerts
from .setup import setup

__all__ = [
    "ENGINE_KEY",
    "AlertEngine",
    "AlertStoreError",
    "AlertsError",
    "AlertsSpec",
    "RuleError",
    "parse_alerts",
    "setup",
]
