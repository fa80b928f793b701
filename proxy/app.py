"""create_app(): routes, and one cleanup context per long-lived resource, in dependency order.

Startup order is client session -> SQLite store -> Redis view -> writer -> forwarder; teardown runs in
reverse, so the writer drains every queued record into the store before the store closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy import dashboard, exports
from proxy.access import ADMIN_KEY, AdminAccess, warn_if_exposed
from proxy.answers import json_error
from proxy.api import alerts as alerts_api
from proxy.api import analytics as analytics_api
from proxy.api import auth as auth_api
from proxy.api import content as content_api
from proxy.api import conversations as conversations_api
from proxy.api import health as health_api
from proxy.api import model_actions as model_actions_api
from proxy.api import system as system_api
from proxy.api import usage as usage_api
from proxy.config import Config
from proxy.forward.handler import Forwarder
from proxy.forward.pool_probe import PoolProbe
from proxy.forward.tokens import estimate_tokens
from proxy.forward.upstream_client import UpstreamPool
from proxy.forward.upstream_probe import UpstreamProbe
from proxy.guard import (
    GUARD_STATS_KEY,
    HOST_GUARD_KEY,
    GuardedAppRunner,
    GuardStats,
    HostGuard,
    host_check_active,
    is_loopback_listen,
)
from proxy.keys import (
    CONFIG_KEY,
    ENGINE_KEY,
    FORWARDER_KEY,
    HEALTH_PARTS_KEY,
    HOSTS_KEY,
    PROBE_KEY,
    REDIS_KEY,
    SESSION_KEY,
    STORE_KEY,
    WRITER_KEY,
)
from proxy.resources.sampler import SAMPLER_KEY
from proxy.upstreams import HostPool
from storage.journal import RunJournal, journal_path
from storage.open_store import retention_for, store_for
from storage.redis_view import RedisView
from storage.retention import RetentionPolicy
from storage.tasks import spawn
from storage.writer import Writer

# The keys are re-exported: tests and tools reach the app's objects through them.
__all__ = [
    "CONFIG_KEY",
    "FORWARDER_KEY",
    "HEALTH_PARTS_KEY",
    "HOSTS_KEY",
    "PROBE_KEY",
    "REDIS_KEY",
    "SESSION_KEY",
    "STORE_KEY",
    "WRITER_KEY",
    "create_app",
    "make_runner",
]

logger = logging.getLogger(__name__)

OLLAMON_PREFIX = "/ollamon"


def create_app(config: Config) -> web.Application:
    """The proxy application for ``config`` (no global state: two apps can run side by side)."""
    s = config.server
    stats = GuardStats()
    app = web.Application(handler_args={"max_field_size": 65536, "max_line_size": 65536})
    # The runner (make_runner) puts the Host check in front of every route when there is a Host to check
    # (listening on loopback, or allowed_hosts set).
    if host_check_active(s.listen_host, s.allowed_hosts):
        app[HOST_GUARD_KEY] = HostGuard(s.allowed_hosts, stats=stats)
    if config.admin.token:
        app[ADMIN_KEY] = AdminAccess(config.admin.token)
    warn_if_exposed(s.listen_host, config.admin.token, loopback=is_loopback_listen(s.listen_host))
    app[CONFIG_KEY] = config
    app[GUARD_STATS_KEY] = stats
    app.on_shutdown.append(_begin_shutdown)
    app[HEALTH_PARTS_KEY] = {}
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_writer_ctx)
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(_forwarder_ctx)
    # Features: each adds its background tasks (cleanup_ctx, after the writer) and /ollamon/ routes.
    alerts_api.setup(app)
    system_api.setup(app)
    analytics_api.setup(app)
    health_api.setup(app)
    model_actions_api.setup(app)
    auth_api.setup(app)
    usage_api.setup(app)
    conversations_api.setup(app)
    content_api.setup(app)
    dashboard.setup(app)
    exports.setup(app)
    app.cleanup_ctx.append(_wire_features)
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
        # Request bodies pass through as sent: a gzip or zstd body (Content-Encoding) must reach Ollama
        # compressed, not be inflated (or refused with 400) by aiohttp on the way in.
        auto_decompress=False,
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
    store = store_for(st)  # SQLite at storage.db, or PostgreSQL for storage.url: postgresql://...
    await store.open()  # migrates, and registers the rollup hook and the resource record types
    app[STORE_KEY] = store
    logger.info("recording to %s", store.path)
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
    st, r = app[CONFIG_KEY].storage, app[CONFIG_KEY].retention
    # Retention writes only through the writer, which starts it with itself and stops it first.
    retention = (
        retention_for(
            app[STORE_KEY],
            RetentionPolicy(r.raw_days, r.system_days, r.rollup_days, r.batch_rows),
            interval_s=r.interval_s,
            checkpoint_interval_s=r.checkpoint_interval_s,
            instance=app[CONFIG_KEY].server.instance_name,
        )
        if r.enabled
        else None
    )
    writer = Writer(
        app[STORE_KEY],
        queue_size=st.queue_size,
        batch_rows=st.batch_rows,
        flush_interval_s=st.flush_interval_ms / 1000.0,
        hot=app.get(REDIS_KEY),
        # PostgreSQL is shared by the fleet: each instance keeps its journal beside where its SQLite would be.
        journal=RunJournal(
            journal_path(st.db_path, app[CONFIG_KEY].server.instance_name if st.postgres else None)
        ),
        # The forwarder starts after the writer; until then nothing is in flight.
        in_flight=lambda: fw.in_flight if (fw := app.get(FORWARDER_KEY)) is not None else 0,
        maintenance=retention,
        instance=app[CONFIG_KEY].server.instance_name,
    )
    await writer.start()
    app[WRITER_KEY] = writer
    # Load the tokenizer now, on a thread, so the first estimate does not stall the first batch.
    warmup = spawn(asyncio.to_thread(estimate_tokens, "warm up"), name="tokenizer-warmup")
    yield
    await writer.stop()
    if not warmup.done():
        await warmup


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Ollama hosts (docs/upstreams.md); health checks run only when there are several."""
    c = app[CONFIG_KEY]
    hosts = HostPool(c.upstreams.settings(c.server.upstream), app[SESSION_KEY])
    if not hosts.single:
        await hosts.start()
        # server.upstream may be no host at all: health, readiness and alerts ask the pool instead.
        app[PROBE_KEY] = PoolProbe(hosts)
    app[HOSTS_KEY] = hosts
    yield
    await hosts.stop()


async def _forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
    c = app[CONFIG_KEY]
    s = c.server
    hosts = app[HOSTS_KEY]
    pool = UpstreamPool(
        s.upstream_value, connect_timeout_s=s.connect_timeout_s, idle_timeout_s=s.idle_timeout_s
    )
    conns = (
        None
        if hosts.single
        else {
            h.name: UpstreamPool(
                h.upstream, connect_timeout_s=s.connect_timeout_s, idle_timeout_s=s.idle_timeout_s
            )
            for h in hosts.hosts
        }
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
        hosts=hosts,
        conns=conns,
    )
    yield
    await pool.close()
    for conn in (conns or {}).values():
        await conn.close()


async def _wire_features(app: web.Application) -> AsyncIterator[None]:
    """Connect features that started independently: resource samples feed the alert engine."""
    sampler, engine = app.get(SAMPLER_KEY), app.get(ENGINE_KEY)
    if sampler is not None and engine is not None:
        sampler.add_listener(engine.observe_system)
    yield


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER_KEY].handle(request)


async def ollamon_not_found(request: web.Request) -> web.Response:
    return json_error(404, f"ollamon: no such endpoint {request.method} {request.rel_url.path}")
