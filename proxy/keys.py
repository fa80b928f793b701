"""The application keys under which ``create_app`` keeps each long-lived object (``app[STORE_KEY]``).

A module of its own so that the features (``proxy.api.*``) can reach the shared objects without
importing the app wiring, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from alerts.engine import AlertEngine
from proxy.config import Config
from proxy.forward.handler import Forwarder
from proxy.forward.upstream_probe import UpstreamProbe
from proxy.upstreams import HostPool
from storage.open_store import AnyStore
from storage.redis_view import RedisView
from storage.writer import Writer

__all__ = [
    "CONFIG_KEY",
    "ENGINE_KEY",
    "FORWARDER_KEY",
    "HEALTH_PARTS_KEY",
    "HOSTS_KEY",
    "PROBE_KEY",
    "REDIS_KEY",
    "SESSION_KEY",
    "STORE_KEY",
    "WRITER_KEY",
    "HealthPart",
]

CONFIG_KEY = web.AppKey("config", Config)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
STORE_KEY = web.AppKey[AnyStore]("store")  # SQLite, or PostgreSQL (storage/open_store.py)
REDIS_KEY = web.AppKey("redis", RedisView)
WRITER_KEY = web.AppKey("writer", Writer)
FORWARDER_KEY = web.AppKey("forwarder", Forwarder)
PROBE_KEY = web.AppKey("upstream_probe", UpstreamProbe)
# The Ollama hosts (proxy/upstreams/): server.upstream alone is a pool of one.
HOSTS_KEY = web.AppKey("upstream_hosts", HostPool)
# Set by proxy/api/alerts.py when alerts are on; the dashboard and the exports read the engine's state.
ENGINE_KEY = web.AppKey("alert_engine", AlertEngine)

# Features add sections to /ollamon/health: name -> function returning a JSON-able value (sync, cheap).
HealthPart = Callable[[], Any]
HEALTH_PARTS_KEY = web.AppKey("health_parts", dict[str, HealthPart])
