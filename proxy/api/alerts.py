"""The alerts feature in the app: ``setup(app)`` validates the rules, starts the engine, and serves
``/ollamon/api/alerts``, ``/ollamon/api/alerts/{id}`` and ``/ollamon/api/alert-rules``.

Rules are validated while the app is being built, so a bad rule stops ``ollamon serve`` before anything
starts (the CLI prints the ``RuleError`` and exits with status 2). The engine starts in a cleanup context
after the writer's, subscribes to the writer's committed batches, and is stopped before the writer drains.

Alerts come from the ``alerts`` table (read through storage, written through the writer: alerts/store.py);
for open ones the live value and message from the engine's
memory replace the stored ones (the table is written on transitions only, not at every evaluation).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from alerts.engine import AlertEngine
from alerts.errors import AlertStoreError
from alerts.rules import AlertsSpec, parse_alerts
from alerts.store import AlertStore
from proxy.answers import json_error, json_response
from proxy.config import Config
from proxy.keys import CONFIG_KEY, ENGINE_KEY, HEALTH_PARTS_KEY, PROBE_KEY, STORE_KEY, WRITER_KEY
from storage.lease import Lease
from storage.postgres.lease import pg_lease
from storage.records import iso_utc

__all__ = ["ENGINE_KEY", "SPEC_KEY", "get_alert", "list_alerts", "list_rules", "setup"]

SPEC_KEY = web.AppKey("alert_spec", AlertsSpec)

STATES = ("firing", "pending", "resolved", "open", "all")
MAX_LIMIT = 1000


def _engine(request: web.Request) -> AlertEngine | None:
    return request.app.get(ENGINE_KEY)


def _overlay(engine: AlertEngine, row: dict[str, Any]) -> dict[str, Any]:
    for a in engine.alerts.values():
        if a.id == row["id"]:
            row.update(value=a.value, message=a.message, values=a.values)
            if a.last_error is not None:
                row["last_error"] = a.last_error
    return row


async def list_alerts(request: web.Request) -> web.Response:
    """``?state=firing|pending|resolved|open|all`` (default all), ``?limit=`` (default 100), newest first."""
    state = request.query.get("state", "all")
    if state not in STATES:
        return json_error(400, f"bad parameter 'state': must be one of {', '.join(STATES)}, got {state!r}")
    try:
        limit = int(request.query.get("limit", "100"))
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        return json_error(400, f"bad parameter 'limit': an integer from 1 to {MAX_LIMIT}")
    engine = _engine(request)
    if engine is None or engine.store is None:
        return json_error(503, "alerts are disabled (alerts.enabled is false)")
    try:
        rows = await engine.store.list_alerts(state, limit)
    except AlertStoreError as exc:
        return json_error(503, f"the database cannot answer now: {exc}")
    return json_response({"state": state, "alerts": [_overlay(engine, r) for r in rows]})


async def get_alert(request: web.Request) -> web.Response:
    """One alert with its state transitions."""
    try:
        alert_id = int(request.match_info["id"])
    except ValueError:
        return json_error(400, f"bad alert id {request.match_info['id']!r}: expected an integer")
    engine = _engine(request)
    if engine is None or engine.store is None:
        return json_error(503, "alerts are disabled (alerts.enabled is false)")
    try:
        row = await engine.store.get_alert(alert_id)
    except AlertStoreError as exc:
        return json_error(503, f"the database cannot answer now: {exc}")
    if row is None:
        return json_error(404, f"no alert {alert_id}")
    return json_response(_overlay(engine, row))


def _iso(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else iso_utc(epoch_s)


def _rule_times_iso(rule: dict[str, Any]) -> dict[str, Any]:
    """The engine keeps Unix seconds; the API gives times as ISO-8601 UTC, like every other endpoint."""
    instances = [{**i, "since": _iso(i["since"])} for i in rule["instances"]]
    return {**rule, "last_evaluated_at": _iso(rule["last_evaluated_at"]), "instances": instances}


async def list_rules(request: web.Request) -> web.Response:
    """Every rule with its current state (worst over its label sets) and its last values."""
    engine = _engine(request)
    if engine is None:
        return json_error(503, "alerts are disabled (alerts.enabled is false)")
    return json_response(
        {
            "interval_s": engine.interval_s,
            "evaluations": engine.evaluations,
            "lease": engine.lease.snapshot(),
            "rules": [_rule_times_iso(r) for r in engine.rule_states()],
        }
    )


def setup(app: web.Application) -> None:
    """Validate the rules (raising ``RuleError``), add the API routes, the health part and the engine."""
    config = app[CONFIG_KEY]
    app[SPEC_KEY] = parse_alerts(config.alerts.rules, config.alerts.channels, config.source)
    app[HEALTH_PARTS_KEY]["alerts"] = lambda: _health(app)
    app.router.add_get("/ollamon/api/alerts", list_alerts)
    app.router.add_get("/ollamon/api/alerts/{id}", get_alert)
    app.router.add_get("/ollamon/api/alert-rules", list_rules)
    if config.alerts.enabled:
        app.cleanup_ctx.append(_engine_ctx)


def _health(app: web.Application) -> dict[str, Any]:
    engine = app.get(ENGINE_KEY)
    if engine is None:
        return {"enabled": False}
    return {"enabled": True, **engine.counts()}


def alert_lease(config: Config) -> Lease | None:
    """On a shared PostgreSQL database, the fleet's alert lease (one evaluator, docs/alerts.md "Fleets");
    alone on SQLite, None: always held."""
    if not config.storage.postgres:
        return None
    a = config.alerts
    ttl_s = a.lease_ttl_s or 0.6 * a.interval_s
    return pg_lease(config.storage.url, "alerts", ttl_s=ttl_s, instance=config.server.instance_name)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    writer = app[WRITER_KEY]
    store = AlertStore(writer, app[STORE_KEY].reads)  # writes through the writer, reads through storage
    await store.open()
    probe = app[PROBE_KEY]

    async def reachable() -> bool:
        return bool((await probe.check()).get("reachable"))

    engine = AlertEngine(
        app[SPEC_KEY],
        interval_s=config.alerts.interval_s,
        resolve_delay_s=config.alerts.resolve_delay_s,
        store=store,
        probe=reachable,
        dropped=lambda: writer.dropped,
        lease=alert_lease(config),
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
