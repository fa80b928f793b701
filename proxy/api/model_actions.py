"""Model actions from ollamon's own API (filled in by the model-actions work)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register the model-action routes."""
