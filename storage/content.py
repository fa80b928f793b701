"""Rows of ``content_analysis``: what the content analyzer found in one request (docs/content.md).

``ContentRecord`` travels through the writer like any record; ``register_content(store)`` teaches the
store to insert it inside the batch transaction. PII is kinds and counts only (``{"email": 2}``), never
the values. The table is keyed by ``request_id``; model, user and key come from ``inference_metrics``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiosqlite
import orjson

__all__ = ["CONTENT_COLUMNS", "ContentRecord", "create_content_table", "register_content"]


@dataclass(slots=True)
class ContentRecord:
    """One row of ``content_analysis``; ``status`` is ``ok``, ``failed`` (``error`` says why) or ``skipped``."""

    request_id: str
    timestamp: str  # the request's own timestamp, so windows match inference_metrics
    analyzed_at: str
    status: str
    error: str | None = None
    prompt_pii: dict[str, int] | None = None
    response_pii: dict[str, int] | None = None
    pii_count: int | None = None
    prompt_language: str | None = None
    prompt_language_confidence: float | None = None
    response_language: str | None = None
    response_language_confidence: float | None = None
    guard_model: str | None = None
    verdict: str | None = None  # safe | unsafe | None (no guard model, or it failed)
    categories: list[str] | None = None
    guard_latency_ms: float | None = None
    toxicity: float | None = None
    sentiment: float | None = None
    analysis_ms: float | None = None

    def build(self) -> ContentRecord:
        return self


CONTENT_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ContentRecord))
_JSON = frozenset({"prompt_pii", "response_pii", "categories"})
_INSERT = (
    f"INSERT OR REPLACE INTO content_analysis ({', '.join(CONTENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(CONTENT_COLUMNS))})"
)


def create_content_table(conn: sqlite3.Connection) -> None:
    """The table and its time index (migration m011)."""
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS content_analysis (
            request_id TEXT PRIMARY KEY,
            timestamp TEXT NOT NULL,
            analyzed_at TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            prompt_pii TEXT,
            response_pii TEXT,
            pii_count INTEGER,
            prompt_language TEXT,
            prompt_language_confidence REAL,
            response_language TEXT,
            response_language_confidence REAL,
            guard_model TEXT,
            verdict TEXT,
            categories TEXT,
            guard_latency_ms REAL,
            toxicity REAL,
            sentiment REAL,
            analysis_ms REAL
        )
        """
    )
    conn.execute("CREATE INDEX IF NOT EXISTS idx_content_timestamp ON content_analysis(timestamp)")


def _value(column: str, value: Any) -> Any:
    if value is not None and column in _JSON:
        return orjson.dumps(value).decode()
    return value


async def _write(db: aiosqlite.Connection, items: list[Any]) -> None:
    rows = [tuple(_value(c, getattr(item, c)) for c in CONTENT_COLUMNS) for item in items]
    await db.executemany(_INSERT, rows)


class _Registry(Protocol):
    def register(
        self, record_type: type, write: Callable[[aiosqlite.Connection, list[Any]], Awaitable[None]]
    ) -> None: ...


def register_content(store: _Registry) -> None:
    """Let the writer's batches carry ``ContentRecord`` rows."""
    store.register(ContentRecord, _write)
