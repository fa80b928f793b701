"""otel export (filled in by the exports work)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register this export's routes and background tasks."""
