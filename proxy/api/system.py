"""Resources in the app: the sampler and inventory lifecycles, and their JSON routes.

``setup(app)`` adds two cleanup contexts (after the writer's, so teardown stops them before the writer
drains) and ``GET /ollamon/api/system`` (latest sample and recent history) and ``GET /ollamon/api/models``
(the inventory). It also hands the energy meter and the inventory to the forwarder, which passes them to
each ``Capture``. ``GPU_PROVIDER_KEY`` may be set before startup to replace NVML (tests, gpu-check).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.answers import BadParameter, json_error, json_response
from proxy.keys import (
    CONFIG_KEY,
    FORWARDER_KEY,
    HEALTH_PARTS_KEY,
    REDIS_KEY,
    SESSION_KEY,
    STORE_KEY,
    WRITER_KEY,
)
from proxy.resources.energy import EnergyMeter
from proxy.resources.inventory import INVENTORY_KEY, Inventory
from proxy.resources.nvml import GpuMonitor, GpuProvider, PynvmlProvider
from proxy.resources.sampler import SAMPLER_KEY, RedisLatest, Sampler, Snapshot
from proxy.resources.system_stats import SystemReader
from storage.errors import StorageError
from storage.records import iso_utc
from storage.resources import SYSTEM_COLUMNS, GpuSample, SystemSample

__all__ = ["ENERGY_KEY", "GPU_PROVIDER_KEY", "setup"]

GPU_PROVIDER_KEY = web.AppKey("gpu_provider", GpuProvider)
ENERGY_KEY = web.AppKey("energy_meter", EnergyMeter)

DEFAULT_MINUTES = 5.0
MAX_MINUTES = 7 * 24 * 60.0
_GPU_FIELDS = (
    "name",
    "uuid",
    "utilization_percent",
    "memory_utilization_percent",
    "memory_used_mb",
    "memory_total_mb",
    "memory_percent",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "throttle_reasons",
)


def setup(app: web.Application) -> None:
    """Register the sampler and inventory contexts and the two routes."""
    app.cleanup_ctx.append(_sampler_ctx)
    app.cleanup_ctx.append(_inventory_ctx)
    app.router.add_get("/ollamon/api/system", system_view)
    app.router.add_get("/ollamon/api/models", models_view)


async def _sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    sp = config.sampling
    if not sp.enabled:
        yield
        return
    gpu = None
    if sp.gpu:
        provider = app.get(GPU_PROVIDER_KEY) or PynvmlProvider()
        gpu = GpuMonitor(provider, call_timeout_s=max(0.5, min(2.0, 0.9 * sp.interval_s)))
    view = app.get(REDIS_KEY)
    redis = RedisLatest(view, timeout_s=config.redis.timeout_ms / 1000.0) if view is not None else None
    reader = await asyncio.to_thread(SystemReader, config.storage.db_path, sp.paths)
    meter = EnergyMeter()
    sampler = Sampler(
        reader,
        interval_s=sp.interval_s,
        store_every_s=sp.store_every_s,
        gpu=gpu,
        writer=app[WRITER_KEY],
        meter=meter,
        redis=redis,
    )
    app[SAMPLER_KEY] = sampler
    app[ENERGY_KEY] = meter
    app[FORWARDER_KEY].energy = meter
    app[HEALTH_PARTS_KEY]["sampler"] = sampler.status
    await sampler.start()
    yield
    await sampler.stop()


async def _inventory_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    inv = config.inventory
    if not inv.enabled:
        yield
        return
    inventory = Inventory(
        session=app[SESSION_KEY],
        upstream=config.server.upstream_value,
        writer=app[WRITER_KEY],
        ps_interval_s=inv.ps_interval_s,
        tags_interval_s=inv.tags_interval_s,
        cold_load_ms=inv.cold_load_ms,
        backoff_max_s=max(60.0, inv.ps_interval_s),
    )
    app[INVENTORY_KEY] = inventory
    await inventory.start(initial_timeout_s=min(3.0, config.server.connect_timeout_s))
    app[FORWARDER_KEY].models = inventory
    app[HEALTH_PARTS_KEY]["inventory"] = inventory.status
    yield
    app[FORWARDER_KEY].models = None
    await inventory.stop()


# -- /ollamon/api/system ---------------------------------------------------------------------------


def _minutes(request: web.Request) -> float:
    raw = request.query.get("minutes")
    if raw is None:
        return DEFAULT_MINUTES
    try:
        value = float(raw)
    except ValueError:
        raise BadParameter("minutes", f"expected a number of minutes, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_MINUTES:
        raise BadParameter("minutes", f"must be > 0 and <= {MAX_MINUTES:g}, got {raw!r}")
    return value


def _gpu_json(g: GpuSample | dict[str, Any], detail: bool) -> dict[str, Any]:
    get = g.get if isinstance(g, dict) else (lambda k: getattr(g, k))
    out: dict[str, Any] = {"index": get("gpu_index")}
    out.update({k: get(k) for k in _GPU_FIELDS})
    if detail:
        out["processes"] = get("processes")
    return out


def _snapshot_json(snap: Snapshot, detail: bool) -> dict[str, Any]:
    s: SystemSample = snap.system
    out: dict[str, Any] = {c: getattr(s, c) for c in SYSTEM_COLUMNS if c != "extra"}
    if detail and s.extra:
        out.update(s.extra)
    out["gpus"] = [_gpu_json(g, detail) for g in snap.gpus or ()]
    return out


def _stored_history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored samples as the API shows them: each GPU row shaped like a live one."""
    for row in rows:
        row["gpus"] = [_gpu_json(g, detail=False) for g in row["gpus"]]
    return rows


async def system_view(request: web.Request) -> web.Response:
    """``GET /ollamon/api/system?minutes=N``: the latest sample and the last N minutes (default 5)."""
    try:
        minutes = _minutes(request)
    except BadParameter as exc:
        return json_error(400, str(exc))
    sampler = request.app.get(SAMPLER_KEY)
    if sampler is None:
        return json_response({"enabled": False, "latest": None, "history": [], "minutes": minutes})
    latest = sampler.latest
    body: dict[str, Any] = {
        "enabled": True,
        "latest": _snapshot_json(latest, detail=True) if latest is not None else None,
        "minutes": minutes,
        "gpu": sampler.gpu.status() if sampler.gpu is not None else {"state": "disabled"},
    }
    if minutes * 60.0 <= sampler.memory_window_s:
        body["source"], body["resolution_s"] = "memory", sampler.interval_s
        body["history"] = [_snapshot_json(s, detail=False) for s in sampler.history(minutes * 60.0)]
    else:
        since = iso_utc(time.time() - minutes * 60.0)
        store = request.app[STORE_KEY]
        body["source"], body["resolution_s"] = "database", sampler.store_every_s
        try:
            body["history"] = _stored_history(await asyncio.to_thread(store.reads.system_history, since))
        except StorageError as exc:
            return json_error(503, f"ollamon: cannot read stored samples from {store.path}: {exc}")
    return json_response(body)


# -- /ollamon/api/models ---------------------------------------------------------------------------


async def models_view(request: web.Request) -> web.Response:
    """``GET /ollamon/api/models``: every model the inventory knows, and its recent events."""
    inventory: Inventory | None = request.app.get(INVENTORY_KEY)
    if inventory is None:
        return json_response({"enabled": False, "models": [], "events": []})
    models = [dataclasses.asdict(m) for _, m in sorted(inventory.models.items())]
    events = [dataclasses.asdict(e) for e in reversed(inventory.events)]
    return json_response({"enabled": True, "models": models, "events": events, "status": inventory.status()})
