"""``setup(app)``: wires the alert engine into the proxy application.

Rules are validated here, while the app is being built, so a bad rule stops ``ollamon serve`` before
anything starts (a ``RuleError`` is a ``ConfigError``: the CLI prints it and exits with status 2). The
engine itself starts in a cleanup context after the writer's, subscribes to the writer's committed
batches, and is stopped before the writer drains.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from . import api
from .engine import AlertEngine
from .keys import ENGINE_KEY, SPEC_KEY
from .rules import parse_alerts
from .store import AlertStore

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Validate the rules (raising ``RuleError``), add the API routes, the health part and the engine."""
    from proxy.app import CONFIG_KEY, HEALTH_PARTS_KEY  # not at the top: proxy.app imports this module

    config = app[CONFIG_KEY]
    app[SPEC_KEY] = parse_alerts(config.alerts.rules, config.alerts.channels, config.source)
    app[HEALTH_PARTS_KEY]["alerts"] = lambda: _health(app)
    app.router.add_get("/ollamon/api/alerts", api.list_alerts)
    app.router.add_get("/ollamon/api/alerts/{id}", api.get_alert)
    app.router.add_get("/ollamon/api/alert-rules", api.list_rules)
    if config.alerts.enabled:
        app.cleanup_ctx.append(_engine_ctx)


def _health(app: web.Application) -> dict[str, Any]:
    engine = app.get(ENGINE_KEY)
    if engine is None:
        return {"enabled": False}
    return {"enabled": True, **engine.counts()}


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    from proxy.app import CONFIG_KEY, PROBE_KEY, STORE_KEY, WRITER_KEY

    config = app[CONFIG_KEY]
    store = AlertStore(app[STORE_KEY].path, busy_timeout_ms=config.storage.busy_timeout_ms)
    await store.open()
    probe = app[PROBE_KEY]
    writer = app[WRITER_KEY]

    async def reachable() -> bool:
        return bool((await probe.check()).get("reachable"))

    engine = AlertEngine(
        app[SPEC_KEY],
        interval_s=config.alerts.interval_s,
        resolve_delay_s=config.alerts.resolve_delay_s,
        store=store,
        probe=reachable,
        dropped=lambda: writer.dropped,
    )
    try:
        await engine.start()
    except BaseException:
        await store.close()
        raise
    writer.add_listener(engine)
    app[ENGINE_KEY] = engine
    yield
    await engine.stop()
    await store.close()
