"""Usage: routes and wiring (being written)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register this feature's routes and background tasks."""
