"""``/ollamon/health`` (what is true now, always 200) and ``/ollamon/ready`` (503 when ollamon cannot
forward and record: the upstream or database writes are down)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy import __version__
from proxy.answers import json_response
from proxy.guard import guard_stats
from proxy.keys import (
    FORWARDER_KEY,
    HEALTH_PARTS_KEY,
    HOSTS_KEY,
    PROBE_KEY,
    REDIS_KEY,
    STORE_KEY,
    WRITER_KEY,
)

__all__ = ["health", "ready", "setup"]


def setup(app: web.Application) -> None:
    app.router.add_get("/ollamon/health", health)
    app.router.add_get("/ollamon/ready", ready)


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
    hosts = app.get(HOSTS_KEY)
    if hosts is not None and not hosts.single:
        body["upstreams"] = hosts.snapshot()
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
