"""Records of the resource sidecars (system and GPU samples, the model inventory) and their SQLite writers.

They travel through the same writer as the request records: ``register_resources(store)`` (which
``SQLiteStore.open()`` calls) teaches the store to insert them inside the batch transaction. Field names are column names (units in the names);
docs/metrics.md ("Resources") defines every one. ``timestamp`` is ISO-8601 UTC with ms and ``Z``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiosqlite
import orjson

__all__ = [
    "GPU_COLUMNS",
    "MODEL_EVENT_COLUMNS",
    "MODEL_INFO_COLUMNS",
    "SYSTEM_COLUMNS",
    "GpuSample",
    "ModelEvent",
    "ModelInfo",
    "SystemSample",
    "register_resources",
]


@dataclass(slots=True)
class SystemSample:
    """One row of ``system_metrics``: the host and ollamon itself at one instant."""

    timestamp: str
    cpu_percent: float | None = None
    memory_percent: float | None = None
    memory_used_gb: float | None = None
    memory_total_gb: float | None = None
    swap_percent: float | None = None
    disk_percent: float | None = None
    disk_free_gb: float | None = None
    net_sent_bytes_per_s: float | None = None
    net_recv_bytes_per_s: float | None = None
    load_1m: float | None = None
    load_5m: float | None = None
    load_15m: float | None = None
    process_rss_mb: float | None = None
    process_cpu_percent: float | None = None
    swap_used_gb: float | None = None
    disk_total_gb: float | None = None
    disk_path: str | None = None
    net_sent_bytes: int | None = None
    net_recv_bytes: int | None = None
    cpu_count: int | None = None
    gpu_count: int | None = None
    # JSON: {"cpu_per_core": [...], "disks": {path: {...}}}
    extra: dict[str, Any] | None = None

    def build(self) -> SystemSample:
        return self


@dataclass(slots=True)
class GpuSample:
    """One row of ``gpu_metrics``: one GPU at one instant (absent fields: NVML does not expose them)."""

    timestamp: str
    gpu_index: int
    name: str | None = None
    uuid: str | None = None
    temperature_c: float | None = None
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    memory_percent: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    throttle_reasons: str | None = None  # comma-separated names, "" when not throttled
    processes: list[dict[str, Any]] | None = None  # JSON [{"pid", "used_memory_mb"}]
    throttle_reasons_mask: int | None = None  # NVML's raw bitmask

    def build(self) -> GpuSample:
        return self


@dataclass(slots=True)
class ModelInfo:
    """The ``model_info`` row of one model name (upserted: the row is the model's current state)."""

    model_name: str
    updated_at: str
    model_version: str | None = None  # the digest
    family: str | None = None
    families: list[str] | None = None
    format: str | None = None
    parameter_size: str | None = None
    parameter_count: int | None = None
    quantization_level: str | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    capabilities: list[str] | None = None
    template_hash: str | None = None
    size_bytes: int | None = None
    modified_at: str | None = None
    installed: bool = True
    loaded: bool = False
    size_vram_bytes: int | None = None
    loaded_at: str | None = None
    expires_at: str | None = None
    first_seen: str | None = None

    def build(self) -> ModelInfo:
        return self


@dataclass(slots=True)
class ModelEvent:
    """One row of ``model_events``: ``seen`` (new model), ``version`` (digest changed), ``load``,
    ``unload``, ``removed`` (gone from /api/tags)."""

    timestamp: str
    model_name: str
    event: str
    model_version: str | None = None
    previous_version: str | None = None
    source: str | None = None  # tags | ps | request
    request_id: str | None = None
    detail: dict[str, Any] | None = None

    def build(self) -> ModelEvent:
        return self


def _columns(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


SYSTEM_COLUMNS = _columns(SystemSample)
GPU_COLUMNS = _columns(GpuSample)
MODEL_INFO_COLUMNS = _columns(ModelInfo)
MODEL_EVENT_COLUMNS = _columns(ModelEvent)
_JSON = frozenset({"extra", "processes", "families", "capabilities", "detail"})


def _value(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in _JSON:
        return orjson.dumps(value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def _rows(items: list[Any], columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [tuple(_value(c, getattr(item, c)) for c in columns) for item in items]


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_INSERT_SYSTEM = _insert("system_metrics", SYSTEM_COLUMNS)
_INSERT_GPU = _insert("gpu_metrics", GPU_COLUMNS)
_INSERT_EVENT = _insert("model_events", MODEL_EVENT_COLUMNS)
# first_seen is kept from the first insert; every other column takes the newest state.
_UPSERT_MODEL = (
    _insert("model_info", MODEL_INFO_COLUMNS)
    + " ON CONFLICT(model_name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in MODEL_INFO_COLUMNS if c not in ("model_name", "first_seen"))
)


async def _write_system(db: aiosqlite.Connection, items: list[Any]) -> None:
    await db.executemany(_INSERT_SYSTEM, _rows(items, SYSTEM_COLUMNS))


async def _write_gpu(db: aiosqlite.Connection, items: list[Any]) -> None:
    await db.executemany(_INSERT_GPU, _rows(items, GPU_COLUMNS))


async def _write_models(db: aiosqlite.Connection, items: list[Any]) -> None:
    await db.executemany(_UPSERT_MODEL, _rows(items, MODEL_INFO_COLUMNS))


async def _write_events(db: aiosqlite.Connection, items: list[Any]) -> None:
    await db.executemany(_INSERT_EVENT, _rows(items, MODEL_EVENT_COLUMNS))


class _Registry(Protocol):
    def register(
        self, record_type: type, write: Callable[[aiosqlite.Connection, list[Any]], Awaitable[None]]
    ) -> None: ...


def register_resources(store: _Registry) -> None:
    """Let the writer's batches carry the four resource record types."""
    store.register(SystemSample, _write_system)
    store.register(GpuSample, _write_gpu)
    store.register(ModelInfo, _write_models)
    store.register(ModelEvent, _write_events)
