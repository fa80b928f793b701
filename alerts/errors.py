"""What the alerts package raises on purpose.

::

    AlertsError                      anything the alerts package cannot do
     +-- RuleError                   a bad alert rule or channel: names the source, the key and the reason, the
     |                               key reading ``alerts.rules[2] (high-error-rate).when.window``
     +-- AlertStoreError             the alerts table cannot be read or written

``ollamon serve`` reports a ``RuleError`` like any other config mistake (``proxy.errors.CONFIG_ERRORS``,
exit 2); this package imports nothing from ``proxy``.
"""

from __future__ import annotations

__all__ = ["AlertStoreError", "AlertsError", "RuleError"]


class AlertsError(Exception):
    """The alerts package cannot do what was asked."""


class RuleError(AlertsError):
    """An alert rule or channel in ``source`` is unusable; ``key`` names the rule and the field.

    ``str()`` reads ``<source>: <key>: <reason>``, like ``proxy.errors.ConfigError``.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class AlertStoreError(AlertsError):
    """Reading or writing the ``alerts`` tables failed; the message names the database."""
