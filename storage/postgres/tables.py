"""How each record type becomes rows of its table: the column list, the converters, and the statement.

Why a table of specs instead of one writer function per type: the store needs to know, before the batch's
transaction, which partitioned table a record lands in and on which day, so it can create that day's
partition first; and every append-only table takes the same fast path (binary ``COPY``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.content import CONTENT_COLUMNS, ContentRecord
from storage.postgres.rows import Convert, converters, fast_row, fit_inference, row_of
from storage.records import ERROR_COLUMNS, INFERENCE_COLUMNS, ErrorRecord, InferenceRecord
from storage.resources import (
    GPU_COLUMNS,
    MODEL_EVENT_COLUMNS,
    MODEL_INFO_COLUMNS,
    SYSTEM_COLUMNS,
    GpuSample,
    ModelEvent,
    ModelInfo,
    SystemSample,
)

__all__ = ["SPECS", "TEXT_COLUMNS", "TEXT_SPEC", "Spec", "row", "spec"]

TEXT_COLUMNS: tuple[str, ...] = ("request_id", "timestamp", "prompt_text", "response_text")


@dataclass(frozen=True, slots=True)
class Spec:
    """``table`` gets ``columns`` of each record: by ``COPY`` (``upsert`` empty), else by ``upsert`` per row."""

    table: str
    columns: tuple[str, ...]
    upsert: str = ""
    convert: list[Convert] = field(default_factory=list)
    fast: Callable[[Any], tuple[Any, ...]] | None = None


def _upsert(table: str, columns: Sequence[str], key: str, keep: Sequence[str] = ()) -> str:
    marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key and c not in keep)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {sets}"


def spec(table: str, columns: tuple[str, ...], upsert: str = "") -> Spec:
    return Spec(table, columns, upsert, converters(table, columns), fast_row(columns))


SPECS: dict[type, Spec] = {
    InferenceRecord: spec("inference_metrics", INFERENCE_COLUMNS),
    ErrorRecord: spec("error_metrics", ERROR_COLUMNS),
    SystemSample: spec("system_metrics", SYSTEM_COLUMNS),
    GpuSample: spec("gpu_metrics", GPU_COLUMNS),
    ModelEvent: spec("model_events", MODEL_EVENT_COLUMNS),
    # first_seen is kept from the first insert; every other column takes the newest state (as in SQLite).
    ModelInfo: spec(
        "model_info",
        MODEL_INFO_COLUMNS,
        _upsert("model_info", MODEL_INFO_COLUMNS, "model_name", ("first_seen",)),
    ),
    # SQLite's INSERT OR REPLACE: a repeated request id replaces the whole row.
    ContentRecord: spec(
        "content_analysis", CONTENT_COLUMNS, _upsert("content_analysis", CONTENT_COLUMNS, "request_id")
    ),
}
TEXT_SPEC = spec("request_text", TEXT_COLUMNS)


def row(item: Any, s: Spec, checked: bool) -> tuple[Any, ...]:
    """``item``'s row for ``s.table``: as it is (``checked`` False, the fast path), or with every value checked
    and converted, raising TypeError / OverflowError naming the column when one cannot fit."""
    if not checked and s.fast is not None:
        return s.fast(item)
    if isinstance(item, InferenceRecord):
        fit_inference(item)  # integers beyond 64 bits and unencodable metadata, as SQLite keeps them
    return row_of(item, s.columns, s.convert)
