"""What one live frame says: computed once per tick from memory, for every open page.

Nothing here reads SQLite or waits on the network in the tick: the status parts that need I/O (the upstream
probe, the database and Redis checks) are refreshed by a task of their own at most every
``STATUS_EVERY_S`` and the frame shows their last answer with its age. The rest comes from objects already in
memory: the figures (figures.py), the forwarder's live requests, the inventory, the sampler and the alert
engine. docs/dashboard.md defines every field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from alerts.engine import AlertEngine
from proxy import __version__
from proxy.access import ADMIN_KEY
from proxy.dashboard.figures import LiveFigures
from proxy.forward.live import live_by_model
from proxy.keys import (
    CONFIG_KEY,
    ENGINE_KEY,
    FORWARDER_KEY,
    PROBE_KEY,
    REDIS_KEY,
    STORE_KEY,
    WRITER_KEY,
)
from proxy.resources.inventory import INVENTORY_KEY, model_key
from proxy.resources.sampler import SAMPLER_KEY, Snapshot
from storage.records import iso_utc
from storage.tasks import spawn

__all__ = ["STATUS_EVERY_S", "StatusCache", "build_frame", "find_engine"]

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0
_GPU_FIELDS = (
    "name",
    "utilization_percent",
    "memory_used_mb",
    "memory_total_mb",
    "memory_percent",
    "temperature_c",
    "power_w",
    "power_limit_w",
)
_SYSTEM_FIELDS = (
    "timestamp",
    "cpu_percent",
    "memory_percent",
    "memory_used_gb",
    "memory_total_gb",
    "load_1m",
    "process_rss_mb",
    "process_cpu_percent",
)


def find_engine(app: web.Application) -> AlertEngine | None:
    """The alert engine, when alerts are on."""
    return app.get(ENGINE_KEY)


class StatusCache:
    """Upstream, database and Redis state, refreshed off the tick (each check is bounded: 2 s, 1 s, timeout)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.value: dict[str, Any] = {"upstream": None, "db": None, "redis": None, "checked_at": None}
        self._task: asyncio.Task[None] | None = None
        self._at = -1e9

    def refresh_if_due(self) -> None:
        """Start a refresh when the last one is older than STATUS_EVERY_S and none is running."""
        if self._task is not None and not self._task.done():
            return
        if time.monotonic() - self._at < STATUS_EVERY_S:
            return
        self._at = time.monotonic()
        self._task = spawn(self._refresh(), name="dashboard-status")

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _refresh(self) -> None:
        app = self.app
        view = app.get(REDIS_KEY)
        try:
            upstream, db, redis_state = await asyncio.gather(
                app[PROBE_KEY].check(),
                app[STORE_KEY].health(),
                view.check() if view is not None else asyncio.sleep(0, "disabled"),
            )
        except Exception as exc:  # a check that breaks shows as unknown, never stops the frames
            logger.warning("dashboard: status check failed: %s", exc)
            return
        cause = app[WRITER_KEY].outage.cause
        if db == "ok" and cause is not None:
            db = f"write failing: {cause}"
        self.value = {
            "upstream": upstream,
            "db": db,
            "redis": redis_state,
            "checked_at": iso_utc(time.time()),
        }


def _system(snap: Snapshot | None, gpu_status: dict[str, Any]) -> dict[str, Any] | None:
    if snap is None:
        return {"latest": None, "gpu": gpu_status}
    s = snap.system
    gpus = [{"index": g.gpu_index, **{k: getattr(g, k) for k in _GPU_FIELDS}} for g in snap.gpus or ()]
    return {"latest": {**{k: getattr(s, k) for k in _SYSTEM_FIELDS}, "gpus": gpus}, "gpu": gpu_status}


def _alerts(engine: AlertEngine | None) -> list[dict[str, Any]]:
    if engine is None:
        return []
    out = []
    for a in engine.alerts.values():
        if a.state not in ("pending", "firing"):
            continue
        since = a.fired_at if a.state == "firing" else a.started_at
        out.append(
            {
                "id": a.id,
                "rule": a.rule,
                "state": a.state,
                "severity": a.severity,
                "labels": a.labels,
                "value": a.value,
                "threshold": a.threshold,
                "message": a.message,
                "since": iso_utc(since) if since is not None else None,
            }
        )
    out.sort(key=lambda r: (r["state"] != "firing", r["rule"]))
    return out


def build_frame(app: web.Application, figures: LiveFigures, status: StatusCache, seq: int) -> dict[str, Any]:
    """One live frame; ``seq`` is the newest recent row the previous frame carried."""
    now = time.time()
    config = app[CONFIG_KEY]
    inventory = app.get(INVENTORY_KEY)
    loaded_fn = None
    loaded: list[dict[str, Any]] = []
    if inventory is not None:
        models = inventory.models
        seen: dict[str, bool | None] = {}  # per frame: one model_key() per model, not per live request

        def loaded_fn(name: str) -> bool | None:
            if name in seen:
                return seen[name]
            info = models.get(model_key(name))
            state = seen[name] = None if info is None else info.loaded
            return state

        loaded = [
            {"model": name, "size_vram_bytes": m.size_vram_bytes, "expires_at": m.expires_at}
            for name, m in sorted(models.items())
            if m.loaded
        ]
    forwarder = app[FORWARDER_KEY]
    per_model = live_by_model(forwarder.live, loaded=loaded_fn, num_parallel=config.inventory.num_parallel)
    tiles = figures.tiles(now)
    tiles["in_flight"] = sum(m.in_flight for m in per_model.values())
    tiles["waiting"] = sum(m.waiting for m in per_model.values())
    sampler = app.get(SAMPLER_KEY)
    if sampler is not None:
        gpu_status = sampler.gpu.status() if sampler.gpu is not None else {"state": "disabled"}
        system = _system(sampler.latest, gpu_status)
    else:
        system = None
    engine = find_engine(app)
    alerts = _alerts(engine)
    writer = app[WRITER_KEY]
    st = status.value
    return {
        "time": iso_utc(now),
        "seq": figures.seq,
        "version": __version__,
        "status": {
            **st,
            "alerts_enabled": engine is not None,
            "alerts_firing": sum(1 for a in alerts if a["state"] == "firing"),
            "alerts_pending": sum(1 for a in alerts if a["state"] == "pending"),
            "queue_depth": writer.stats()["queue_depth"],
            "records_dropped": writer.dropped,
            "inventory": inventory is not None,
            "admin_token": ADMIN_KEY in app,
            "num_parallel": config.inventory.num_parallel,
        },
        "tiles": tiles,
        "live": {name: m.as_dict() for name, m in sorted(per_model.items())},
        "loaded": loaded,
        "minutes": figures.minute_points(now),
        "system": system,
        "requests": figures.rows_after(seq),
        "alerts": alerts,
    }
