"""The live dashboard: GET /ollamon/ (page and assets from the package) and GET /ollamon/api/live (SSE)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register the dashboard's routes and background tasks (filled in by the dashboard work)."""
