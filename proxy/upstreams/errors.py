"""Errors of the multi-upstream layer.

UpstreamsError
 ├── UpstreamsConfigError   an ``upstreams`` entry is unusable: names the key (``upstreams.hosts[2].url``)
 └── NoUpstreamError        no configured host may take this request (all excluded, or none serves the model)

``UpstreamsConfigError`` is a ValueError so that proxy/config.py can wrap it into a ConfigError naming the
file too; this package never imports proxy/config.py (that would be an import cycle).
"""

from __future__ import annotations

__all__ = ["NoUpstreamError", "UpstreamsConfigError", "UpstreamsError"]


class UpstreamsError(Exception):
    """Base of the errors this package raises on purpose."""


class UpstreamsConfigError(UpstreamsError, ValueError):
    """``str()`` reads ``<key>: <reason>``; ``key`` and ``reason`` are kept apart for ConfigError."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class NoUpstreamError(UpstreamsError):
    """No host can take the request; the forwarder answers 502 ``{"error": str(exc)}``."""
