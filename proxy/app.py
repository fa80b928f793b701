"""create_app(): routes, and one cleanup context per long-lived resource, in dependency order.

Startup order is client session -> SQLite store -> Redis view -> writer -> forwarder; teardown runs in
reverse, so the writer drains every queued record into the store before the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

import alerts
from storage.journal import RunJournal, journal_path
from storage.redis_view import RedisView
from storage.sqlite import SQLiteStore
from storage.writer import Writer

from . import __version__
from .config import Config
from .forward import Forwarder
from .guard import (
    GUARD_STATS_KEY,
    GuardedAppRunner,
    GuardStats,
    HostGuard,
    guard_stats,
    host_check_active,
    host_guard,
)
from .http_json import json_error, json_response
from .relay import UpstreamPool
from .tasks import spawn
from .tokens import estimate_tokens
from .upstream import Upstream

__all__ = [
    "CONFIG_KEY",
    "FORWARDER_KEY",
    "HEALTH_PARTS_KEY",
    "REDIS_KEY",
    "SESSION_KEY",
    "STORE_KEY",
    "WRITER_KEY",
    "create_app",
    "make_runner",
]

logger = logging.getLogger(__name__)

CONFIG_KEY = web.AppKey("config", Config)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
STORE_KEY = web.AppKey("store", SQLiteStore)
REDIS_KEY = web.AppKey("redis", RedisView)
WRITER_KEY = web.AppKey("writer", Writer)
FORWARDER_KEY = web.AppKey("forwarder", Forwarder)

OLLAMON_PREFIX = "/ollamon"

# Features add sections to /ollamon/health: name -> function returning a JSON-able value (sync, cheap).
HealthPart = Callable[[], Any]
HEALTH_PARTS_KEY = web.AppKey("health_parts", dict[str, HealthPart])


class UpstreamProbe:
    """``GET /`` against the upstream, at most one in flight and cached for a couple of seconds."""

    def __init__(self, session: aiohttp.ClientSession, upstream: Upstream, ttl_s: float = 2.0) -> None:
        self.session = session
        self.upstream = upstream
        self.ttl_s = ttl_s
        self._lock = asyncio.Lock()
        self._at = 0.0
        self._result: dict[str, Any] = {}

    async def check(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl_s and self._result:
                return self._result
            start = time.perf_counter()
            result: dict[str, Any] = {"url": str(self.upstream)}
            try:
                async with self.session.get(
                    self.upstream.url_for("/", ""),
                    headers={"Host": self.upstream.host_header},
                    timeout=aiohttp.ClientTimeout(total=2.0),
                ) as resp:
                    await resp.read()
                    result["reachable"] = resp.status < 500
                    result["status_code"] = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result["reachable"] = False
                result["error"] = f"{type(exc).__name__}: {exc}"
            result["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 2)
            self._result, self._at = result, time.monotonic()
            return result


PROBE_KEY = web.AppKey("upstream_probe", UpstreamProbe)


def create_app(config: Config) -> web.Application:
    """The proxy application for ``config`` (no global state: two apps can run side by side)."""
    s = config.server
    stats = GuardStats()
    middlewares: list[Middleware] = []
    # No middleware at all when there is no Host to check (not loopback, no allowed_hosts).
    if host_check_active(s.listen_host, s.allowed_hosts):
        middlewares.append(host_guard(HostGuard(s.allowed_hosts, stats=stats)))
    app = web.Application(
        middlewares=middlewares, handler_args={"max_field_size": 65536, "max_line_size": 65536}
    )
    app[CONFIG_KEY] = config
    app[GUARD_STATS_KEY] = stats
    app.on_shutdown.append(_begin_shutdown)
    app[HEALTH_PARTS_KEY] = {}
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_writer_ctx)
    app.cleanup_ctx.append(_forwarder_ctx)
    # Features: each adds its background tasks (cleanup_ctx, after the writer) and /ollamon/api/ routes.
    alerts.setup(app)
    from . import api_system  # imported here: it imports this module's keys

    api_system.setup(app)
    from . import api  # imported here: it imports this module's keys

    api.setup(app)
    # (feature setup calls go here)
    app.cleanup_ctx.append(_wire_features)
    app.router.add_get(f"{OLLAMON_PREFIX}/health", health)
    app.router.add_get(f"{OLLAMON_PREFIX}/ready", ready)
    app.router.add_route("*", OLLAMON_PREFIX, ollamon_not_found)
    app.router.add_route("*", f"{OLLAMON_PREFIX}/{{tail:.*}}", ollamon_not_found)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner ollamon serves with: handler cancellation on (a client disconnect reaches the upstream
    at once), no access log on the hot path, requests cut exactly ``server.shutdown_grace_s`` after shutdown
    begins, ``server.header_timeout_s`` and ``server.max_connections`` enforced (proxy/guard.py)."""
    s = config.server
    return GuardedAppRunner(
        app,
        header_timeout_s=s.header_timeout_s,
        max_connections=s.max_connections,
        stats=app[GUARD_STATS_KEY],
        handler_cancellation=True,
        keepalive_timeout=s.keepalive_timeout_s,
        shutdown_timeout=s.shutdown_grace_s,
        access_log=None,
    )


async def _begin_shutdown(app: web.Application) -> None:
    """Shutdown has begun (sites closed, handlers not cut yet): streams cut from now on are shutdown's doing."""
    forwarder = app.get(FORWARDER_KEY)
    if forwarder is not None:
        forwarder.begin_shutdown()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[CONFIG_KEY].server
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=False),
        timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout_s, sock_read=s.idle_timeout_s),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        max_line_size=65536,
        max_field_size=65536,
    )
    app[SESSION_KEY] = session
    app[PROBE_KEY] = UpstreamProbe(session, s.upstream_value)
    yield
    await session.close()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    st = app[CONFIG_KEY].storage
    store = SQLiteStore(
        st.db_path,
        synchronous="FULL" if st.synchronous.lower() == "full" else "NORMAL",
        busy_timeout_ms=st.busy_timeout_ms,
        store_text=st.store_text,
    )
    await store.open()
    app[STORE_KEY] = store
    logger.info("recording to %s", st.db_path)
    yield
    await store.close()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    r = app[CONFIG_KEY].redis
    if not r.url:
        yield
        return
    view = RedisView(r.url, recent=r.recent, timeout_s=r.timeout_ms / 1000.0)
    await view.start()
    app[REDIS_KEY] = view
    yield
    await view.stop()


async def _writer_ctx(app: web.Application) -> AsyncIterator[None]:
    st = app[CONFIG_KEY].storage
    writer = Writer(
        app[STORE_KEY],
        queue_size=st.queue_size,
        batch_rows=st.batch_rows,
        flush_interval_s=st.flush_interval_ms / 1000.0,
        hot=app.get(REDIS_KEY),
        journal=RunJournal(journal_path(st.db_path)),
        # The forwarder starts after the writer; until then nothing is in flight.
        in_flight=lambda: fw.in_flight if (fw := app.get(FORWARDER_KEY)) is not None else 0,
    )
    await writer.start()
    app[WRITER_KEY] = writer
    # Load the tokenizer now, on a thread, so the first estimate does not stall the first batch.
    warmup = spawn(asyncio.to_thread(estimate_tokens, "warm up"), name="tokenizer-warmup")
    yield
    await writer.stop()
    if not warmup.done():
        await warmup


async def _forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG_KEY]
    s = c.server
    pool = UpstreamPool(
        s.upstream_value, connect_timeout_s=s.connect_timeout_s, idle_timeout_s=s.idle_timeout_s
    )
    app[FORWARDER_KEY] = Forwarder(
        upstream=s.upstream_value,
        pool=pool,
        writer=app[WRITER_KEY],
        trusted=s.trusted_networks,
        user_id_header=s.user_id_header,
        max_inspect_bytes=s.max_inspect_bytes,
        store_text=c.storage.store_text,
        idle_timeout_s=s.idle_timeout_s,
        client_stall_timeout_s=s.client_stall_timeout_s,
        max_inspect_total_bytes=s.max_inspect_total_bytes,
    )
    yield
    await pool.close()


async def _wire_features(app: web.Application) -> AsyncIterator[None]:
    """Connect features that started independently: resource samples feed the alert engine."""
    from .sampler import SAMPLER_KEY

    sampler, engine = app.get(SAMPLER_KEY), app.get(alerts.ENGINE_KEY)
    if sampler is not None and engine is not None:
        sampler.add_listener(engine.observe_system)
    yield


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER_KEY].handle(request)


async def ollamon_not_found(request: web.Request) -> web.Response:
    return json_error(404, f"ollamon: no such endpoint {request.method} {request.rel_url.path}")


async def _db_state(app: web.Application) -> str:
    """``ok``, ``down`` (a read fails) or ``write failing: <cause>`` (reads work, the writer's writes fail)."""
    db: str = await app[STORE_KEY].health()
    cause = app[WRITER_KEY].outage.cause
    if db == "ok" and cause is not None:
        return f"write failing: {cause}"
    return db


async def health(request: web.Request) -> web.Response:
    app = request.app
    view = app.get(REDIS_KEY)
    # All three checks are bounded (upstream 2 s, database 1 s, Redis its timeout) and run side by side.
    upstream, db, redis_state = await asyncio.gather(
        app[PROBE_KEY].check(),
        _db_state(app),
        view.check() if view is not None else asyncio.sleep(0, "disabled"),
    )
    writer = app[WRITER_KEY]
    stats = writer.stats()
    degraded = db != "ok" or redis_state == "down" or not upstream.get("reachable")
    body = {
        "status": "degraded" if degraded else "ok",
        "version": __version__,
        "upstream": upstream,
        "db": db,
        "redis": redis_state,
        "writer": stats,
        "queue_depth": stats.get("queue_depth"),
        "records_dropped": stats.get("dropped"),
        "in_flight": app[FORWARDER_KEY].in_flight,
        "previous_run": writer.previous_run,
        "guard": guard_stats(app),
        "forwarding": app[FORWARDER_KEY].stats(),
    }
    for name, part in app[HEALTH_PARTS_KEY].items():
        body[name] = part()
    return json_response(body)


async def ready(request: web.Request) -> web.Response:
    """200 when requests can be forwarded and recorded now, else 503 with the reasons (Redis not needed)."""
    app = request.app
    upstream, db = await asyncio.gather(app[PROBE_KEY].check(), _db_state(app))
    reasons: list[str] = []
    if not upstream.get("reachable"):
        why = upstream.get("error") or f"HTTP {upstream.get('status_code')}"
        reasons.append(f"upstream {upstream.get('url')} is unreachable: {why}")
    if db != "ok":
        reasons.append(f"database: {db}")
    if not app[WRITER_KEY].stats()["running"]:
        reasons.append("the writer is not running")
    body = {"status": "not ready" if reasons else "ready", "reasons": reasons, "upstream": upstream, "db": db}
    return json_response(body, 503 if reasons else 200)
