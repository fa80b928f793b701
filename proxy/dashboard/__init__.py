"""The live dashboard: GET /ollamon/ (page and assets from the package) and GET /ollamon/api/live (SSE).

Modules: ``routes`` (the page and its assets), ``live`` (the stream and its fan-out), ``snapshot`` (what one
frame says), ``figures`` (the in-memory request figures behind it). docs/dashboard.md describes the page.
"""

from __future__ import annotations

from aiohttp import web

from proxy.dashboard.live import setup_live
from proxy.dashboard.routes import setup_routes
from proxy.keys import CONFIG_KEY

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register the dashboard's routes and its live task, unless ``dashboard.enabled`` is false."""
    if not app[CONFIG_KEY].dashboard.enabled:
        return
    setup_routes(app)
    setup_live(app)
