"""ollamon's own exceptions.

OllamonError
 ├── ConfigError        bad config file, environment variable or flag: names the source, key and reason
 └── UpstreamError      the upstream URL cannot be used
"""

from __future__ import annotations

from alerts.errors import RuleError

__all__ = ["CONFIG_ERRORS", "ConfigError", "OllamonError", "UpstreamError"]


class OllamonError(Exception):
    """Base of every error ollamon raises on purpose."""


class ConfigError(OllamonError):
    """A configuration value is unusable. ``str()`` reads ``<source>: <key>: <reason>``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class UpstreamError(OllamonError):
    """The upstream URL cannot be parsed into scheme, host and port."""


# Every mistake in the configuration: ollamon's own keys, and alert rules and channels (alerts.errors).
CONFIG_ERRORS: tuple[type[Exception], ...] = (ConfigError, RuleError)
