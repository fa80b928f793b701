"""Exports to the stacks operators already run: Prometheus (GET /ollamon/metrics) and OpenTelemetry (OTLP)."""

from __future__ import annotations

from aiohttp import web

from proxy.exports import otel, prometheus

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Register both exports (each reads its own config section and may do nothing)."""
    prometheus.setup(app)
    otel.setup(app)
