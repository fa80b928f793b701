"""The application keys the alerts feature stores its objects under (``app[ENGINE_KEY]``)."""

from __future__ import annotations

from aiohttp import web

from .engine import AlertEngine
from .rules import AlertsSpec

__all__ = ["ENGINE_KEY", "SPEC_KEY"]

ENGINE_KEY = web.AppKey("alert_engine", AlertEngine)
SPEC_KEY = web.AppKey("alert_spec", AlertsSpec)
