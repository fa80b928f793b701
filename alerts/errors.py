"""What the alerts package raises on purpose.

::

    OllamonError                     (proxy.errors)
     +-- ConfigError                 (proxy.errors) names the source, the key and the reason
     |    +-- RuleError              a bad alert rule or channel: the key reads
     |                               ``alerts.rules[2] (high-error-rate).when.window``
     +-- AlertsError                 anything else the alert engine cannot do
          +-- AlertStoreError        the alerts table cannot be read or written

``RuleError`` is a ``ConfigError`` so ``ollamon serve`` reports it like any other config mistake (exit 2).
"""

from __future__ import annotations

from proxy.errors import ConfigError, OllamonError

__all__ = ["AlertStoreError", "AlertsError", "RuleError"]


class RuleError(ConfigError):
    """An alert rule or channel in ``source`` is unusable; ``key`` names the rule and the field."""


class AlertsError(OllamonError):
    """The alert engine cannot do what was asked."""


class AlertStoreError(AlertsError):
    """Reading or writing the ``alerts`` tables failed; the message names the database."""
