"""Exports to the stacks operators already run: Prometheus (GET /ollamon/metrics) and OpenTelemetry (OTLP)."""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register the exports' routes and background tasks (filled in by the exports work)."""
